"""The task layer on its own (no Prefect server): each stage's task function writes its
artifact from its upstream references, reuses a complete one, and evaluate compares the
students the config declares."""
from __future__ import annotations

import math
import os

import pytest

from tasks.common import StageError, upstream_refs
from tasks.registry import StageKey, plan
from tests.tasks.conftest import artifact


def test_every_instance_is_written_once_with_its_fingerprint(task_store):
    cfg, refs = task_store
    fps = {str(k): v for k, v in plan(cfg).items()}
    assert list(refs) == list(fps)
    for key, ref in refs.items():
        assert ref.key == key and ref.fingerprint == fps[key] and not ref.reused
        art = artifact(ref)
        assert art.fingerprint == fps[key] and art.verify().ok, key


def test_prepare_writes_train_dev_and_eval(task_store):
    cfg, refs = task_store
    art = artifact(refs["prepare"])
    assert {s.name for s in art.shards} == {"train", "dev", "eval"}
    ids = {split: {r["id"] for r in art.read_table(split).to_pylist()}
           for split in ("train", "dev", "eval")}
    assert not ids["train"] & ids["dev"] and not ids["dev"] & ids["eval"]
    assert len(ids["dev"]) == cfg.data.demo.n_dev


def test_a_complete_artifact_is_reused_untouched(task_store):
    from tasks.tokenize import tokenize_stage

    cfg, refs = task_store
    ref = refs["tokenize"]
    manifest = os.path.join(ref.path, "manifest.json")
    before = os.stat(manifest).st_mtime_ns
    key = StageKey("tokenize")
    again = tokenize_stage.fn(cfg, key, ref.fingerprint,
                              {k: refs[k] for k in ("prepare", "generate")})
    assert again.reused and again.path == ref.path
    assert os.stat(manifest).st_mtime_ns == before


def test_each_student_trains_with_its_own_objective(task_store):
    cfg, refs = task_store
    hist = {label: artifact(refs[f"distill[{label},seed=0]"]).read_table("history").to_pylist()
            for label in ("cot2align", "sft", "dskd")}
    assert all(h[-1]["step"] == cfg.distill.training.steps for h in hist.values())
    assert all(r["kd"] == 0 and r["ot"] == 0 for r in hist["sft"])
    assert all(r["kd"] > 0 and r["ot"] == 0 for r in hist["dskd"])
    assert all(r["kd"] > 0 and r["ot"] > 0 for r in hist["cot2align"])
    summaries = {label: ref.summary["objective"] for key, ref in refs.items()
                 if (label := StageKey.parse(key).label) is not None}
    assert summaries == {"cot2align": "dskd+ot", "sft": "sft", "dskd": "dskd", "uld": "uld",
                         "uld_cot2align": "uld+ot", "mined": "mined",
                         "mined_cot2align": "mined+ot", "no_cross": "dskd+ot",
                         "no_cross_b": "dskd+ot", "last_layer_only": "dskd+ot",
                         "mid_layer": "dskd+ot", "uncertainty_weights": "dskd+ot",
                         "demo_default": "dskd+ot", "anchored": "dskd+ot", "relaxed": "dskd+ot"}
    for label in ("no_cross", "no_cross_b", "last_layer_only", "uld_cot2align", "mid_layer",
                  "uncertainty_weights", "demo_default", "anchored", "relaxed"):
        h = artifact(refs[f"distill[{label},seed=0]"]).read_table("history").to_pylist()
        assert all(r["ot"] > 0 for r in h), label
    mid = artifact(refs["distill[mid_layer,seed=0]"]).read_table("history").column_names
    assert any(k.startswith("ot/main/") and not k.endswith(("/embedding", "/last"))
               for k in mid), mid  # the middle layer really has its own OT term
    cross_b = [k for k in artifact(refs["distill[no_cross_b,seed=0]"]).read_table("history")
               .column_names if k.startswith("ot/cross_b")]
    assert cross_b == []  # the ablation really drops the term


def test_evaluate_scores_every_model_and_compares_with_the_references(task_store):
    cfg, refs = task_store
    art = artifact(refs["evaluate"])
    gens = art.read_kind("generations").to_pylist()
    n_rows = cfg.evaluate.max_rows
    models = {(g["model"], g["seed_of_model"]) for g in gens}
    assert models == {(st.label, 0) for st in cfg.students()} | {("teacher", None)}
    per_model = len(cfg.evaluate.forms) * (1 + len(cfg.evaluate.seeds)) * n_rows
    assert len(gens) == len(models) * per_model
    diffs = art.read_table("differences").to_pylist()
    pairs = {(d["model"], d["reference"]) for d in diffs}
    assert {("cot2align", "sft"), ("cot2align", "dskd"), ("dskd", "sft"),
            ("uld_cot2align", "uld"), ("mined_cot2align", "mined"), ("no_cross", "dskd")} <= pairs
    assert ("uld_cot2align", "dskd") not in pairs and ("sft", "dskd") not in pairs
    assert all(d["low"] <= d["diff"] <= d["high"] for d in diffs)
    metrics = art.read_table("metrics").to_pylist()
    teacher = [m for m in metrics if m["model"] == "teacher"]
    assert teacher and all(m["n_seeds"] == 1 and math.isnan(m["std"]) for m in teacher)


def test_the_report_shows_only_the_terms_each_model_trained_with(task_store):
    from tasks.report import first_seed_histories

    cfg, refs = task_store
    runs = first_seed_histories(cfg, refs)
    assert "kd" not in runs["sft"][0] and "ot" not in runs["sft"][0]
    assert "ot" not in runs["dskd"][0] and "kd" in runs["dskd"][0]
    assert {"kd", "ot"} <= set(runs["cot2align"][0])
    report = os.path.join(refs["evaluate"].path, "report", "report.md")
    text = open(report, encoding="utf-8").read()
    assert "## Paired differences" in text and "differences.png" in text
    assert "## OT health at the end of training" in text and "own / shuffled" in text
    assert "teacher's own" in text


def test_health_table_judges_cross_pairs_against_the_teachers_own_ratio():
    from tasks.report import health_table

    last = {"step": 9, "health/ratio/main/cot-cot/last": 0.5,
            "health/ratio/cross_a/standard-cot/last": 0.9,
            "health/reference/cross_a/standard-cot/last": 0.91,
            "health/ratio/cross_b/cot-standard/embedding": 0.95,
            "health/reference/cross_b/cot-standard/embedding": 0.82}
    lines = health_table({"s": [last]}).splitlines()
    row = {key: next(line for line in lines if key in line)
           for key in ("main/cot-cot/last", "cross_a/standard-cot/last",
                       "cross_b/cot-standard/embedding")}
    assert row["main/cot-cot/last"].rstrip(" |").endswith("yes")
    assert "0.910" in row["cross_a/standard-cot/last"]
    assert row["cross_a/standard-cot/last"].rstrip(" |").endswith("as the teacher's")
    assert row["cross_b/cot-standard/embedding"].rstrip(" |").endswith("weak")


def test_a_missing_upstream_names_the_artifact_and_the_command(task_cfg, tmp_path):
    from storage.store import ArtifactStore

    cfg = task_cfg.model_copy(update={"store": str(tmp_path / "empty")})
    with pytest.raises(StageError, match=r"needs the 'prepare' artifact.*cot2align stage prepare"):
        upstream_refs(ArtifactStore(cfg.store), cfg, StageKey("distill", "sft", 0))


def test_students_keep_their_best_dev_step(task_store):
    """With distill.selection, every student is scored greedily on the dev split every N steps
    (and at the last), the scores go to its history, and the weights it saves are those of
    the best step (the earliest of equal scores)."""
    cfg, refs = task_store
    for label in ("cot2align", "sft", "dskd"):
        ref = refs[f"distill[{label},seed=0]"]
        hist = artifact(ref).read_table("history").to_pylist()
        scored = {r["step"]: r["dev/score"] for r in hist if r.get("dev/score") is not None}
        assert sorted(scored) == [3, 6]
        assert all(f"dev/exact_match/{f}" in hist[2] for f in cfg.distill.selection.forms)
        best = max(scored.values())
        assert ref.summary["best_step"] == min(s for s, v in scored.items() if v == best)
        assert ref.summary["best_dev_score"] == round(best, 2)


def test_ot_students_log_the_health_of_their_ot_terms(task_store):
    """Students with OT terms measure them on a fixed probe batch at every evaluation: own vs
    shuffled teacher cost per pair and layer, and the spread of the mapped states; students
    without OT log none."""
    cfg, refs = task_store
    hist = artifact(refs["distill[cot2align,seed=0]"]).read_table("history").to_pylist()
    measured = [r for r in hist if r.get("dev/score") is not None]
    ratios = [k for k in measured[-1] if k.startswith("health/ratio/") and measured[-1][k]]
    assert {k.split("/")[2] for k in ratios} == {"main", "cross_a", "cross_b"}
    assert {k.split("/")[-1] for k in ratios} == {"embedding", "last"}
    assert all(0 < measured[-1][k] < 2 for k in ratios)
    refs_ = [k for k in measured[-1] if k.startswith("health/reference/")]
    assert {k.split("/")[2] for k in refs_} == {"cross_a", "cross_b"}
    assert all(0 < measured[-1][k] < 2 for k in refs_)
    assert any(k.startswith("health/spread/") for k in measured[-1])
    sft = artifact(refs["distill[sft,seed=0]"]).read_table("history").column_names
    assert not any(k.startswith("health/") for k in sft)


def test_the_anchored_student_starts_its_embedding_map_on_shared_spellings(task_store):
    """``ot.map_init: anchors`` (grid row ``anchored``): before its first step, the student's
    embedding map carries its embeddings of the tokens spelled the same in both vocabularies
    to their own teacher rows, well above shuffled ones; the default random start does not."""
    import torch

    from cot2align_core.mined import same_spelling_pairs
    from tasks.common import load_side_tokenizer, teacher_tensors
    from tasks.distill import distill_job
    from tasks.registry import upstream_keys

    cfg, refs = task_store
    assert cfg.resolve_student("anchored").objective.ot.map_init == "anchors"

    def own_minus_shuffled(label):
        key = StageKey.parse(f"distill[{label},seed=0]")
        ups = {str(u): refs[str(u)] for u in upstream_keys(cfg, key)}
        job = distill_job(cfg, key, ups, "cpu")
        embed, _ = teacher_tensors(artifact(ups["cache_teacher"]), "cpu")
        s_ids, t_ids = same_spelling_pairs(load_side_tokenizer(cfg, "teacher", ups),
                                           load_side_tokenizer(cfg, "student", ups))
        assert len(s_ids) >= 20
        ot = job.objective.ot
        with torch.no_grad():
            x, y = ot.sides(job.model.get_input_embeddings().weight[s_ids].unsqueeze(0),
                            _Rows(t_ids), "embedding", embed)
            x, y = x[0], y[0]
            own = torch.cosine_similarity(x, y, dim=-1).mean()
            shuffled = torch.cosine_similarity(x, y.roll(1, 0), dim=-1).mean()
        return float(own - shuffled)

    assert own_minus_shuffled("anchored") > 0.3
    assert abs(own_minus_shuffled("cot2align")) < 0.15


class _Rows:
    """The teacher side of :meth:`OTAlignment.sides` for given token ids (one row)."""

    def __init__(self, ids):
        import torch

        self.target_ids = torch.tensor([ids])
