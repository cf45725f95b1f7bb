"""Prefect tasks, one module per stage; each takes the config, its fingerprint and the upstream
references, calls core + storage, and returns a small :class:`tasks.common.StageRef`."""
from tasks.cache_teacher import cache_teacher_stage
from tasks.distill import distill_stage
from tasks.evaluate import evaluate_stage
from tasks.generate import generate_stage
from tasks.prepare import prepare_stage
from tasks.teacher_sft import teacher_sft_stage
from tasks.tokenize import tokenize_stage

STAGE_TASKS = {
    "prepare": prepare_stage,
    "teacher_sft": teacher_sft_stage,
    "generate": generate_stage,
    "tokenize": tokenize_stage,
    "cache_teacher": cache_teacher_stage,
    "distill": distill_stage,
    "evaluate": evaluate_stage,
}
