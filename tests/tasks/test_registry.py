"""The stage registry: one table from which plan, flows, CLI and deployments derive; what each
stage fingerprints; student instances; resolved values. No Prefect server is started."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from cot2align_core.config import ConfigError, load_config, parse_config
from tasks.registry import (STAGE_NAMES, STAGES, StageKey, instances, plan, spec, stage_params,
                            upstream_keys)

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo.yaml"
PAPER = REPO / "configs" / "qwen1.5-1.8b_to_gpt2-base.yaml"
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def params_of(overrides: list[str] | None = None, path: Path = DEMO) -> dict[str, dict]:
    cfg = load_config(path, overrides or [])
    return {str(k): stage_params(cfg, k) for k in plan(cfg)}


def changed(override: str, path: Path = DEMO) -> set[str]:
    """Stage instances whose own params change (absent on one side counts as changed)."""
    base, new = params_of(path=path), params_of([override], path=path)
    return {k for k in set(base) | set(new) if base.get(k) != new.get(k)}


# ------------------------------------------------------------------------------- the table
def test_stage_names_are_unique_and_upstreams_come_first():
    assert len(set(STAGE_NAMES)) == len(STAGE_NAMES) == len(STAGES)
    seen: set[str] = set()
    for s in STAGES:
        assert set(s.upstream) <= seen, s.name
        seen.add(s.name)
        assert callable(s.load_task()), s.task


def test_every_task_takes_the_same_arguments():
    import inspect

    for s in STAGES:
        fn = s.load_task().fn
        assert list(inspect.signature(fn).parameters) == ["cfg", "key", "fp", "upstream", "force"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_plans(path, monkeypatch):
    cfg = load_config(path)
    if cfg.teacher.pretrained:
        # The model hub cannot be reached here: a pretrained teacher's depth (read from its
        # config on the hub, for depth-fraction OT layers) is given as the real model's.
        import tasks.common

        monkeypatch.setattr(tasks.common, "teacher_num_layers", lambda cfg: 32)
    fps = plan(cfg)
    assert [k.stage for k in fps][0] == "prepare" and list(fps)[-1] == StageKey("evaluate")
    for key in fps:
        yaml.safe_dump(stage_params(cfg, key))  # plain data: hashable into a fingerprint
        assert all(u in fps for u in upstream_keys(cfg, key))


def test_students_and_seeds_expand_distill():
    cfg = load_config(DEMO, ["distill.seeds=[3,4]"])
    keys = instances(cfg, spec("distill"))
    assert [str(k) for k in keys] == [f"distill[{label},seed={s}]"
                                      for label in ("cot2align", "sft", "dskd") for s in (3, 4)]
    assert set(upstream_keys(cfg, StageKey("evaluate"))) >= set(keys)
    fps = plan(cfg)
    assert len({fps[k] for k in keys}) == len(keys)  # each student and seed its own artifact


def test_two_labels_with_one_objective_share_one_artifact():
    cfg = load_config(DEMO, ["distill.students.sft2={objective: {alpha: 0.0, kd_base: none, ot: null}}"])
    fps = plan(cfg)
    assert fps[StageKey("distill", "sft", 0)] == fps[StageKey("distill", "sft2", 0)]


def test_a_disabled_stage_has_no_instance():
    cfg = load_config(PAPER, ["teacher_sft.enabled=false"])
    assert instances(cfg, spec("teacher_sft")) == []
    assert StageKey("teacher_sft") not in plan(cfg)
    assert StageKey("teacher_sft") not in upstream_keys(cfg, StageKey("generate"))


@pytest.mark.parametrize("text", ["distill[sft,seed=2]", "prepare", "distill[a-b.c,seed=-1]"])
def test_stage_keys_round_trip(text):
    assert str(StageKey.parse(text)) == text


@pytest.mark.parametrize("text", ["train", "distill[sft]", "distill:sft", "distill[sft,seed=x]"])
def test_bad_stage_keys_are_refused_with_the_forms(text):
    with pytest.raises(ConfigError, match="is not a stage"):
        StageKey.parse(text)


def test_an_unknown_stage():
    with pytest.raises(ConfigError, match="unknown stage 'train'.*prepare"):
        spec("train")


# ------------------------------------------------------------------------ what stages read
def test_stage_params_are_deterministic():
    assert params_of() == params_of()


M, S, D = "distill[cot2align,seed=0]", "distill[sft,seed=0]", "distill[dskd,seed=0]"


@pytest.mark.parametrize("override, stages, path", [
    ("evaluate.seeds=[9]", {"evaluate"}, None),
    ("distill.training.lr=0.01", {M, S, D}, None),
    ("generate.temperature=0.7", {"generate"}, None),
    ("tokenize.max_length=300", {"tokenize"}, None),
    # Every stage that renders prompts fits them to the same limit, the same way.
    ("tokenize.max_prompt_length=100", {"teacher_sft", "generate", "tokenize", "evaluate"}, None),
    ("tokenize.truncate_input=middle", {"teacher_sft", "generate", "tokenize", "evaluate"}, None),
    ("generate.shard_timeout_s=60", set(), None),
    ("cache_teacher.dtype=bfloat16", {"cache_teacher"}, None),
    ("cache_teacher.batch_size=3", set(), None),
    ("cache_teacher.device=cpu", set(), None),
    ("distill.training.device=cpu", set(), None),
    ("distill.objective.alpha=0.3", {M, D}, None),    # sft overrides alpha itself
    ("distill.objective.ot.eps=0.2", {M}, None),     # only the main student has OT
    ("teacher_sft.training.steps=31", {"teacher_sft"}, None),
    ("data.demo.n_train=100", {"prepare"}, None),
    ("data.demo.n_dev=50", {"prepare"}, None),
    ("seed=1", {"teacher_sft", M, S, D, "distill[cot2align,seed=1]", "distill[sft,seed=1]",
                "distill[dskd,seed=1]", "evaluate"}, None),
    ("student.scratch.hidden_size=128", {M, S, D}, None),
    ("student.scratch.tokenizer.vocab_size=500", {"prepare", M, S, D}, None),
    ("teacher.scratch.num_layers=2", {"teacher_sft", "generate", "cache_teacher"}, None),
    # What a stage reads through an upstream artifact is left to that artifact's fingerprint:
    # a student's dtype or LoRA rank reruns distill (and evaluate through it), not prepare,
    # the teacher's SFT or its generation.
    ("student.dtype=bfloat16", {"distill[cot2align,seed=42]", "distill[sft,seed=42]",
                                "distill[dskd,seed=42]"}, PAPER),
    ("student.lora_rank=8", {"distill[cot2align,seed=42]", "distill[sft,seed=42]",
                             "distill[dskd,seed=42]"}, PAPER),
    ("teacher.dtype=float32", {"teacher_sft", "generate", "cache_teacher"}, PAPER),
    ("teacher_sft.training.max_length=300", {"teacher_sft"}, PAPER),
    # The student's tokenizer decides how long prompts are cut, for the teacher's texts too.
    ("student.pretrained=gpt2-medium", {"generate", "tokenize", "evaluate",
                                        "distill[cot2align,seed=42]", "distill[sft,seed=42]",
                                        "distill[dskd,seed=42]"}, PAPER),
])
def test_a_parameter_reaches_exactly_the_stages_that_read_it(override, stages, path):
    assert changed(override, path or DEMO) == stages


def test_a_fingerprint_change_reaches_the_downstream_instances():
    base = plan(load_config(DEMO))
    new = plan(load_config(DEMO, ["distill.objective.ot.eps=0.2"]))
    assert {str(k) for k in base if base[k] != new[k]} == {M, "evaluate"}
    new = plan(load_config(DEMO, ["generate.temperature=0.7"]))
    assert {str(k) for k in base if base[k] != new[k]} == set(map(str, base)) - {
        "prepare", "teacher_sft"}


def test_a_default_written_out_gives_the_same_fingerprint():
    base = plan(load_config(DEMO))
    written = plan(load_config(DEMO, ["evaluate.bootstrap=1000", "distill.parallel=1",
                                      "distill.selection.metric=auto"]))
    assert base == written


def test_the_label_is_not_fingerprinted_but_evaluate_sees_it():
    base = plan(load_config(DEMO))
    cfg = load_config(DEMO, ["distill.label=main"])
    new = plan(cfg)
    assert new[StageKey("distill", "main", 0)] == base[StageKey("distill", "cot2align", 0)]
    assert new[StageKey("evaluate")] != base[StageKey("evaluate")]


def test_a_pretrained_teacher_without_sft_still_fingerprints_the_teacher():
    over = ["teacher_sft.enabled=false"]
    base = params_of(over, PAPER)
    new = params_of(over + ["teacher.pretrained=Qwen/Qwen1.5-4B"], PAPER)
    assert {k for k in base if base[k] != new[k]} >= {"generate", "tokenize", "cache_teacher"}


def test_a_student_that_needs_logits_changes_what_is_cached():
    data = yaml.safe_load(DEMO.read_text())
    base = parse_config(copy.deepcopy(data))
    data["distill"]["students"]["uld"] = {"objective": {"kd_base": "uld", "ot": None}}
    new = parse_config(data)
    assert base.needed_topk() == 0 and new.needed_topk() == 64
    k = StageKey("cache_teacher")
    assert stage_params(base, k) != stage_params(new, k)
    m = StageKey("distill", "cot2align", 0)
    assert stage_params(base, m) == stage_params(new, m)


# ---------------------------------------------------------------------------- inputs by content
def test_a_data_file_edited_in_place_reruns_what_reads_it(tmp_path, dolly_dir):
    train = tmp_path / "train.jsonl"
    lines = (dolly_dir / "dev.jsonl").read_text().splitlines()[:40]
    train.write_text("\n".join(lines) + "\n")
    over = [f"data.train_path={train}", "data.eval_path=null", f"store={tmp_path / 'store'}"]
    cfg = load_config(REPO / "configs" / "dolly_tiny.yaml", over)
    before = plan(cfg)
    assert plan(cfg) == before  # unchanged file: same fingerprints (from the digest cache)
    train.write_text("\n".join(lines[:38]) + "\n")  # 40 -> 38 rows, same path
    after = plan(load_config(REPO / "configs" / "dolly_tiny.yaml", over))
    assert {k.stage for k in before if before[k] != after[k]} == set(STAGE_NAMES)


def test_a_local_model_folder_enters_the_fingerprint_by_content(tmp_path):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text('{"hidden_size": 8}')
    over = [f"teacher.pretrained={teacher}", "teacher_sft.enabled=false",
            f"store={tmp_path / 'store'}"]
    before = plan(load_config(PAPER, over))
    (teacher / "config.json").write_text('{"hidden_size": 16}')
    after = plan(load_config(PAPER, over))
    changed_stages = {k.stage for k in before if before[k] != after[k]}
    assert {"generate", "cache_teacher", "evaluate"} <= changed_stages
    assert "prepare" not in changed_stages
    hub = plan(load_config(PAPER, ["teacher_sft.enabled=false", f"store={tmp_path / 'store'}"]))
    assert hub == plan(load_config(PAPER, ["teacher_sft.enabled=false",
                                           f"store={tmp_path / 'store'}"]))  # a hub id: a name


def test_unreachable_pretrained_teacher_depth_is_a_config_error(monkeypatch, tmp_path):
    from cot2align_core.config import ConfigError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config(REPO / "configs" / "paper_table_dolly.yaml",
                      [f"teacher.pretrained={tmp_path / 'no-such-model'}"])
    with pytest.raises(ConfigError, match=r"teacher.pretrained: cannot read the config .*"
                                          r"Download the model first"):
        plan(cfg)


def test_the_five_seed_config_reuses_the_grids_students():
    """configs/demo_objectives_5seeds.yaml says that after paper_table_demo.yaml only seeds 3
    and 4 are trained: its upstream and its seeds 0-2 are the grid's instances."""
    grid = plan(load_config(REPO / "configs" / "paper_table_demo.yaml"))
    five = plan(load_config(REPO / "configs" / "demo_objectives_5seeds.yaml"))
    students = {(k.label, k.seed): fp for k, fp in grid.items() if k.stage == "distill"}
    same_label = {"cot2align": "demo_default"}  # five's main student is the demo's own
    checked = 0
    for key, fp in five.items():
        if key.stage == "distill" and key.seed < 3:
            assert fp == students[(same_label.get(key.label, key.label), key.seed)], key
            checked += 1
        elif key.stage not in ("distill", "evaluate"):
            assert fp == grid[key], key
    assert checked == 7 * 3
    assert {k.seed for k in five if k.stage == "distill"} == {0, 1, 2, 3, 4}
