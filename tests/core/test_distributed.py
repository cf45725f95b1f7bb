"""Distributed training on CPU with gloo: 2 ranks (DDP or FSDP2) against 1 process.

The ranks are started as ``torchrun`` would (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT; :func:`init_distributed` creates the group), all scenarios in one pair of
processes; the single-process references run here. The models are real (a tiny GPT-2), the
loss is the project's (``sft_loss``, the CoT2Align objective with DSKD and OT).

With rows of one length every rank's slice holds as many loss tokens as the others, and the
distributed gradient is the single-process one (see cot2align_core.distributed): the weights
agree to float rounding. Uneven slices (a global batch of 5 on 2 ranks) are exact for such
rows too, through the n_r / n weighting.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from cot2align_core import distributed as dd
from cot2align_core.distributed import DistContext, init_distributed
from cot2align_core.config import ObjectiveConfig
from cot2align_core.objective import CoT2AlignObjective, StudentBatch, TeacherBatch
from cot2align_core.training import collate_sft, sft_loss, train
from storage.checkpoints import CheckpointDir

V_S, D_S, V_T, D_T = 50, 32, 40, 24
STEPS = 5


def tiny_gpt2(seed: int, dropout: float = 0.0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=D_S, n_layer=2, n_head=2, vocab_size=V_S,
                                      n_positions=64, resid_pdrop=dropout, embd_pdrop=dropout,
                                      attn_pdrop=dropout))


def sft_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows of one length (3 prompt + 6 response tokens) with random token ids."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, V_S, (9,), generator=g).tolist(), "prompt_len": 3}
            for _ in range(n)]


def sft_job(n: int, seed: int = 0, dropout: float = 0.0) -> dict:
    return dict(model=tiny_gpt2(seed, dropout), loss_fn=sft_loss, dataset=sft_rows(n),
                collate_fn=lambda rows: collate_sft(rows, pad_id=0), extra=[])


class ObjectiveData:
    """Examples in both forms, every one of the same lengths, with cached teacher states: item
    ``i`` of the dataset is example ``i``; the collate slices the full tensors."""

    def __init__(self, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.student = {f: self._student(g, n, p, r) for f, p, r in (("standard", 3, 5),
                                                                     ("cot", 4, 9))}
        self.teacher = {f: self._teacher(g, n, r) for f, r in (("standard", 6), ("cot", 11))}
        self.embed = torch.randn(V_T, D_T, generator=g) * 0.05
        self.head = torch.randn(V_T, D_T, generator=g)
        self.n = n

    @staticmethod
    def _student(g, n, p, r) -> StudentBatch:
        ids = torch.randint(1, V_S, (n, p + r), generator=g)
        rm = torch.zeros(n, p + r, dtype=torch.long)
        rm[:, p:] = 1
        return StudentBatch(input_ids=ids, attention_mask=torch.ones_like(ids), response_mask=rm,
                            present=torch.ones(n, dtype=torch.bool))

    @staticmethod
    def _teacher(g, n, r) -> TeacherBatch:
        return TeacherBatch(hidden=(torch.randn(n, 1, r, D_T, generator=g) * 4).half(),
                            mask=torch.ones(n, r, dtype=torch.bool),
                            input_ids=torch.randint(0, V_T, (n, r), generator=g),
                            target_ids=torch.randint(0, V_T, (n, r), generator=g),
                            present=torch.ones(n, dtype=torch.bool), layers=(-1,))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, rows: list[int]):
        idx = torch.tensor(rows)
        return ({f: StudentBatch(input_ids=b.input_ids[idx], attention_mask=b.attention_mask[idx],
                                 response_mask=b.response_mask[idx], present=b.present[idx])
                 for f, b in self.student.items()},
                {f: b.select(idx) for f, b in self.teacher.items()})


def objective_job(n: int, kd_base: str, seed: int = 0) -> dict:
    """The CoT2Align objective: CE + OT (+ DSKD): a projector (and DSKD's attention) to learn."""
    data = ObjectiveData(n)
    model = tiny_gpt2(seed)
    objective = CoT2AlignObjective(ObjectiveConfig(alpha=0.5, kd_base=kd_base),
                                   student_dim=D_S, teacher_dim=D_T)

    def loss_fn(m, batch):
        s, t = batch
        return objective(m, s, t, data.embed, data.head)

    return dict(model=model, loss_fn=loss_fn, dataset=data, collate_fn=data.collate,
                extra=[{"params": objective.projector_parameters(), "lr": 3e-3}],
                objective=objective)


def run(job: dict, batch_size: int, ctx: DistContext | None = None, checkpoints=None,
        max_steps=None, on_log=None, **selection):
    result = train(job["model"], job["loss_fn"], job["dataset"], collate_fn=job["collate_fn"],
                   extra_param_groups=job["extra"], batch_size=batch_size, lr=3e-3,
                   steps=STEPS, warmup_steps=1, seed=3, checkpointer=checkpoints,
                   checkpoint_every=2 if checkpoints else 0, resume=checkpoints is not None,
                   max_steps=max_steps, on_log=on_log, dist=ctx, **selection)
    return result


def dev_loss(model, step: int) -> dict[str, float]:
    """A deterministic dev metric: the SFT loss on 6 held-out rows."""
    return {"dev_loss": float(sft_loss(model, collate_sft(sft_rows(6, seed=9), pad_id=0)))}


# "max" picks a state before the last step here (step 2), so restoring it changes the weights.
SELECTION = dict(eval_every=1, eval_fn=dev_loss, select_metric="dev_loss", select_mode="max",
                 restore_best=True)


def weights(job: dict, ctx: DistContext | None = None) -> dict[str, torch.Tensor]:
    ctx = ctx or DistContext()
    state = {f"model.{k}": v.detach().clone() for k, v in dd.model_state(job["model"], ctx).items()}
    if "objective" in job:
        state.update({f"objective.{k}": v.detach().clone()
                      for k, v in job["objective"].state_dict().items()})
    return state


def _scenarios(ctx: DistContext, out: Path) -> None:
    """Every 2-rank run of this module; rank 0 saves what the tests compare."""
    results = {}
    for name, job, batch in (("sft_even", sft_job(16), 4), ("sft_uneven", sft_job(15), 5),
                             ("ot", objective_job(12, "none"), 4),
                             ("dskd", objective_job(12, "dskd"), 4)):
        res = run(job, batch, ctx)
        results[name] = (weights(job), [r["loss"] for r in res.history])
    torch.save(results["dskd"][0], out / f"dskd-{ctx.rank}.pt")
    # Evaluation hooks and best-state selection: rank 0 evaluates, every rank agrees.
    job = sft_job(16)
    res = run(job, 4, ctx, CheckpointDir(out / "select"), **SELECTION)
    results["select"] = (weights(job), [(r["loss"], r["dev_loss"]) for r in res.history],
                         res.best_step)
    fsdp = DistContext(ctx.rank, ctx.world_size, ctx.local_rank, ctx.device, "fsdp")
    job = sft_job(16)
    run(job, 4, fsdp, CheckpointDir(out / "fsdp"))
    results["fsdp"] = (weights(job, fsdp), None)
    # Resume, with dropout: a run stopped at step 3 and continued by fresh objects.
    logged = []
    for name, stops in (("straight", [None]), ("resumed", [3, None])):
        for stop in stops:
            job = sft_job(16, dropout=0.1)
            res = run(job, 4, ctx, CheckpointDir(out / name), max_steps=stop,
                      on_log=lambda rec: logged.append(rec["step"]))
        results[name] = (weights(job), [r["loss"] for r in res.history])
    torch.save(logged, out / f"logged-{ctx.rank}.pt")
    if ctx.is_main:
        torch.save(results, out / "results.pt")


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    try:
        _scenarios(ctx, Path(out))
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The scenarios on 2 ranks: ({name: (weights, losses)}, the folder of their files)."""
    out = tmp_path_factory.mktemp("ranks")
    torch.multiprocessing.spawn(_rank_main, args=(2, _free_port(), str(out)), nprocs=2)
    return torch.load(out / "results.pt", weights_only=False), out


def assert_same_weights(got: dict, want: dict, atol=2e-5):
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=atol, rtol=1e-4, msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("name,n,batch", [("sft_even", 16, 4), ("sft_uneven", 15, 5)])
def test_two_ranks_reach_the_weights_and_losses_of_one(two_ranks, name, n, batch):
    results, _ = two_ranks
    job = sft_job(n)
    res = run(job, batch)
    got_weights, got_losses = results[name]
    assert_same_weights(got_weights, weights(job))
    assert got_losses == pytest.approx([r["loss"] for r in res.history], rel=1e-5)
    before = tiny_gpt2(0).state_dict()
    assert not torch.allclose(before["transformer.h.0.attn.c_attn.weight"],
                              got_weights["model.transformer.h.0.attn.c_attn.weight"])


@pytest.mark.slow
def test_two_ranks_train_the_ot_projector_like_one(two_ranks):
    results, _ = two_ranks
    job = objective_job(12, "none")
    start = {k: v.clone() for k, v in job["objective"].state_dict().items()}
    res = run(job, 4)
    got, losses = results["ot"]
    assert_same_weights(got, weights(job))
    assert losses == pytest.approx([r["loss"] for r in res.history], rel=1e-5)
    assert all(not torch.equal(v, got[f"objective.{k}"]) for k, v in start.items())


@pytest.mark.slow
def test_dskd_attention_stays_synchronised_over_ranks(two_ranks):
    """DSKD masks its token means by which positions the attention predicts right: a slice's
    mask is not its share of the batch's, so two ranks only approximate one process. Both
    ranks still hold the same weights, the learned attention included."""
    results, out = two_ranks
    rank0, rank1 = (torch.load(out / f"dskd-{r}.pt") for r in (0, 1))
    assert_same_weights(rank1, rank0, atol=0)
    assert any(k.startswith("objective.kd.") for k in rank0)  # DSKD's attention
    res = run(objective_job(12, "dskd"), 4)
    assert results["dskd"][1] == pytest.approx([r["loss"] for r in res.history], rel=1e-3)


@pytest.mark.slow
def test_fsdp_two_ranks_match_one_and_its_checkpoint_loads_in_one_process(two_ranks):
    results, out = two_ranks
    job = sft_job(16)
    run(job, 4)
    got, _ = results["fsdp"]
    assert_same_weights(got, weights(job))
    # The final checkpoint holds full tensors: a single process continues from it (the stage
    # loads the ranks' result this way), with an optimizer state of the usual layout.
    loaded = sft_job(16)
    res = run(loaded, 4, checkpoints=CheckpointDir(out / "fsdp"), max_steps=0)
    assert res.steps_done == STEPS
    assert_same_weights(weights(loaded), got, atol=0)


@pytest.mark.slow
def test_resume_on_two_ranks_ends_where_an_uninterrupted_run_does(two_ranks):
    results, out = two_ranks
    straight, resumed = results["straight"], results["resumed"]
    assert_same_weights(resumed[0], straight[0], atol=0)
    assert resumed[1] == straight[1]  # the history, restored from the checkpoint, then extended
    # Only rank 0 saved checkpoints and logged: one file set, each step logged once per run.
    assert sorted(p.name for p in (out / "straight").iterdir()) == ["step-000000004.pt",
                                                                   "step-000000005.pt"]
    assert torch.load(out / "logged-0.pt") == [1, 2, 3, 4, 5, 1, 2, 3, 4, 5]
    assert torch.load(out / "logged-1.pt") == []


@pytest.mark.slow
def test_evaluation_and_best_state_selection_on_two_ranks_match_one(two_ranks, tmp_path):
    results, _ = two_ranks
    job = sft_job(16)
    res = run(job, 4, checkpoints=CheckpointDir(tmp_path / "one"), **SELECTION)
    got_weights, got_history, got_best = results["select"]
    assert got_best == res.best_step == 2
    want = [(r["loss"], r["dev_loss"]) for r in res.history]
    assert [x for pair in got_history for x in pair] == pytest.approx(
        [x for pair in want for x in pair], rel=1e-5)
    assert_same_weights(got_weights, weights(job))  # the restored best state


def test_a_global_batch_smaller_than_the_world_is_refused():
    from cot2align_core.training import check_world_size

    check_world_size(16, 4, False, 2)
    with pytest.raises(ValueError, match="cannot give each of the 4 ranks one"):
        check_world_size(10, 4, False, 4)  # the last batch holds 2
    check_world_size(10, 4, True, 4)
    with pytest.raises(ValueError, match="batch_size of at least 2"):
        check_world_size(16, 1, False, 2)


def test_one_process_is_world_one_and_its_helpers_do_nothing():
    ctx = init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed) == (0, 1, True, False)
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    dd.average_grads([p], ctx)
    assert p.grad.tolist() == [2.0, 2.0, 2.0]
    assert dd.combine_step(ctx, 4, 1.5, {"ce": 1.0}) == (4, 1.5, {"ce": 1.0})
    assert dd.wrap_model(torch.nn.Linear(2, 2), ctx).__class__ is torch.nn.Linear
    with pytest.raises(ValueError, match="strategy must be one of"):
        init_distributed("cpu", strategy="zero3")


def test_seed_step_depends_on_seed_rank_and_step_only():
    draws = {}
    for key in [(0, 0, 1), (0, 1, 1), (0, 0, 2), (1, 0, 1), (0, 0, 1)]:
        dd.seed_step(*key)
        draws.setdefault(key, []).append(torch.rand(3))
    assert torch.equal(*draws[(0, 0, 1)])
    firsts = [v[0] for v in draws.values()]
    assert all(not torch.equal(a, b) for i, a in enumerate(firsts) for b in firsts[i + 1:])
