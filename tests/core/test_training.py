"""The training loop: batches, SFT loss, schedule, data order, checkpoints and exact resume."""
from __future__ import annotations

import dataclasses
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cot2align_core.training import collate_sft, lr_multiplier, move_to_device, sft_loss, train
from storage.checkpoints import CheckpointDir, UnsafeCheckpointError, list_checkpoints

REPO = Path(__file__).resolve().parents[2]


class TinyLM(torch.nn.Module):
    """A causal LM small enough for many steps per second, with dropout (uses the RNG)."""

    def __init__(self, vocab: int = 13, width: int = 16, dropout: float = 0.1):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, width)
        self.mix = torch.nn.Linear(2 * width, width)
        self.norm = torch.nn.LayerNorm(width)
        self.drop = torch.nn.Dropout(dropout)
        self.head = torch.nn.Linear(width, vocab)

    def hidden(self, input_ids):
        x = self.emb(input_ids)
        prev = torch.nn.functional.pad(x, (0, 0, 1, 0))[:, :-1]  # each token sees the one before
        return self.drop(self.norm(torch.tanh(self.mix(torch.cat([x, prev], -1)))))

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.head(self.hidden(input_ids))
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return type("Out", (), {"logits": logits, "loss": loss})()


def toy_examples(n: int = 24, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = int(torch.randint(4, 9, (1,), generator=g))
        ids = [1] + torch.randint(4, 13, (length,), generator=g).tolist() + [2]
        rows.append({"id": i, "input_ids": ids, "prompt_len": 3})
    return rows


def collate(rows):
    return collate_sft(rows, pad_id=0)


def test_collate_sft_pads_right_and_masks_the_response():
    rows = [{"input_ids": [1, 5, 6, 7, 2], "prompt_len": 2}, {"input_ids": [1, 8, 2], "prompt_len": 2}]
    batch = collate_sft(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 2], [1, 8, 2, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["response_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 0, 1, 0, 0]]
    with pytest.raises(ValueError):
        collate_sft([{"input_ids": [1, 2], "prompt_len": 3}], pad_id=0)


def test_sft_loss_is_ce_on_response_tokens_only():
    torch.manual_seed(0)
    model = TinyLM(dropout=0.0)
    batch = collate([{"input_ids": [1, 5, 6, 7, 2], "prompt_len": 2}, {"input_ids": [1, 8, 9], "prompt_len": 1}])
    logits = model(batch["input_ids"]).logits
    terms = []
    for b, (p, n) in enumerate([(2, 5), (1, 3)]):
        for t in range(p, n):  # token t is predicted at position t - 1
            terms.append(torch.nn.functional.cross_entropy(logits[b, t - 1], batch["input_ids"][b, t]))
    assert torch.allclose(sft_loss(model, batch), torch.stack(terms).mean())


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    f = lambda s: lr_multiplier(s, 100, warmup_steps=10, min_lr_ratio=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(100) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 100))
    assert lr_multiplier(50, 100, schedule="constant") == 1.0
    with pytest.raises(ValueError):
        lr_multiplier(50, 100, schedule="linear")


def test_train_reduces_the_loss_and_logs_each_step():
    torch.manual_seed(0)
    model = TinyLM()
    projector = torch.nn.Linear(16, 4)

    def loss_fn(m, batch):
        ce = sft_loss(m, batch)
        aux = projector(m.hidden(batch["input_ids"])).pow(2).mean()
        return ce + 0.1 * aux, {"ce": ce, "aux": aux}

    logged = []
    result = train(
        model, loss_fn, toy_examples(), epochs=10, batch_size=8, lr=1e-2, collate_fn=collate,
        extra_param_groups=[{"module": projector, "lr": 5e-2, "weight_decay": 0.0}],
        warmup_steps=3, on_log=logged.append, log_every=10,
    )
    h = result.history
    assert result.total_steps == 30 and len(h) == 30 and [r["step"] for r in h] == list(range(1, 31))
    assert [r["epoch"] for r in h[:4]] == [0, 0, 0, 1]
    assert set(h[0]) >= {"step", "epoch", "loss", "ce", "aux", "lr", "seconds"}
    assert h[0]["lr"] == pytest.approx(1e-2 / 3) and h[3]["lr"] == pytest.approx(1e-2)
    assert h[-1]["lr"] < 1e-3
    assert sum(r["loss"] for r in h[-5:]) < sum(r["loss"] for r in h[:5])
    assert [r["step"] for r in logged] == [10, 20, 30]
    assert not model.training


def test_train_checks_its_arguments(tmp_path):
    model = TinyLM()
    ckpt = CheckpointDir(tmp_path / "ckpt")
    kw = dict(steps=2, batch_size=4, lr=1e-3, collate_fn=collate)
    with pytest.raises(ValueError):
        train(model, sft_loss, toy_examples(), batch_size=4, lr=1e-3)  # neither steps nor epochs
    with pytest.raises(ValueError, match="checkpointer"):
        train(model, sft_loss, toy_examples(), checkpoint_every=1, **kw)
    with pytest.raises(ValueError, match="eval_fn"):
        train(model, sft_loss, toy_examples(), eval_every=2, **kw)
    with pytest.raises(ValueError, match="select_metric"):  # no checkpointer for the best state
        train(model, sft_loss, toy_examples(), eval_fn=lambda m, s: {"a": 1.0}, select_metric="a", **kw)
    with pytest.raises(ValueError, match="select_mode"):
        train(model, sft_loss, toy_examples(), eval_fn=lambda m, s: {"a": 1.0}, select_metric="a",
              select_mode="best", checkpointer=ckpt, **kw)
    with pytest.raises(ValueError, match="restore_best"):
        train(model, sft_loss, toy_examples(), restore_best=True, **kw)
    with pytest.raises(ValueError, match="'dev/loss'"):  # a metric may not overwrite the record
        train(model, sft_loss, toy_examples(), eval_fn=lambda m, s: {"loss": 1.0}, **kw)
    with pytest.raises(TypeError, match="numbers"):
        train(model, sft_loss, toy_examples(), eval_fn=lambda m, s: {"acc": "high"}, **kw)
    with pytest.raises(ValueError, match="'acc'"):
        train(model, sft_loss, toy_examples(), eval_fn=lambda m, s: {"f1": 1.0}, select_metric="acc",
              checkpointer=ckpt, **kw)
    with pytest.raises(FloatingPointError):
        train(model, lambda m, b: torch.tensor(float("nan"), requires_grad=True), toy_examples(), **kw)


def test_default_data_order_is_the_seeded_pcg64_permutation_and_blocks_are_wired_in():
    """The loop visits the data in the order np.random.default_rng([seed, epoch]) gives (the
    order every earlier run trained on), and shuffle_block_size reaches the sampler."""
    rows = toy_examples(23)

    def visited(**kwargs):
        seen = []

        def recording_collate(batch_rows):
            seen.append([r["id"] for r in batch_rows])
            return collate(batch_rows)

        torch.manual_seed(0)
        train(TinyLM(), sft_loss, rows, steps=7, batch_size=5, lr=1e-3, seed=3,
              collate_fn=recording_collate, **kwargs)
        return seen

    expected = []
    for epoch in range(2):  # 5 batches per epoch: 5, 5, 5, 5, 3
        order = np.random.Generator(np.random.PCG64(np.random.SeedSequence([3, epoch]))).permutation(23)
        expected += [order[i:i + 5].tolist() for i in range(0, 23, 5)]
    assert visited() == expected[:7]
    blocks = visited(shuffle_block_size=4)
    assert blocks != expected[:7]
    epoch0 = sum(blocks[:5], [])
    assert sorted(epoch0) == list(range(23))
    starts = [i for i in range(23) if i == 0 or epoch0[i] // 4 != epoch0[i - 1] // 4]
    assert len(starts) == 6  # 6 blocks of 4 consecutive ids (the last of 3), each visited whole


def test_eval_hooks_do_not_change_the_trajectory(tmp_path):
    """Evaluation that draws from every global RNG (and runs the model) leaves the training
    bit-identical; its metrics land in the records of the evaluated steps."""
    calls = []

    def noisy_eval(model, step):
        calls.append((step, model.training, torch.is_grad_enabled()))
        noise = random.random() + float(np.random.rand()) + float(torch.rand(()))
        out = model(collate(toy_examples(4, seed=9))["input_ids"]).logits
        return {"dev/logit_mean": float(out.mean()), "noise": noise}

    ref_model, ref_proj, ref = _run(tmp_path)
    model, proj, res = _run(tmp_path, eval_every=5, eval_fn=noisy_eval)
    assert without_seconds(r for r in ref.history) == [
        {k: v for k, v in r.items() if k not in ("dev/logit_mean", "noise")}
        for r in without_seconds(res.history)
    ]
    for a, b in zip(list(model.parameters()) + list(proj.parameters()),
                    list(ref_model.parameters()) + list(ref_proj.parameters()), strict=True):
        assert torch.equal(a, b)
    assert calls == [(5, False, False), (10, False, False), (12, False, False)]  # and the last step
    assert [r["step"] for r in res.history if "noise" in r] == [5, 10, 12]
    assert res.best_step is None


def test_best_state_selection_keeps_the_earlier_of_ties_and_is_restored(tmp_path):
    scripted = {3: 0.5, 6: 0.7, 9: 0.7, 12: 0.2}  # max: step 6 (the tie at 9 keeps 6)
    weights_at = {}

    def eval_fn(model, step):
        weights_at[step] = {k: v.clone() for k, v in model.state_dict().items()}
        return {"dev/score": scripted[step]}

    ckpt = CheckpointDir(tmp_path / "ckpt")
    model, _, res = _run(tmp_path, eval_every=3, eval_fn=eval_fn, select_metric="dev/score",
                         checkpointer=ckpt, restore_best=True)
    assert (res.best_step, res.best_metric) == (6, 0.7)
    assert all(torch.equal(v, weights_at[6][k]) for k, v in model.state_dict().items())
    assert not torch.equal(model.head.weight, weights_at[12]["head.weight"])
    assert ckpt.load_best()[0] == 6 and ckpt.steps() == [12]  # the final checkpoint is kept
    # min mode, no restore: the last step is best and the model keeps its final weights
    model, _, res = _run(tmp_path, eval_every=3, eval_fn=eval_fn, select_metric="dev/score",
                         select_mode="min", checkpointer=CheckpointDir(tmp_path / "ckpt2"))
    assert (res.best_step, res.best_metric) == (12, 0.2)
    assert all(torch.equal(v, weights_at[12][k]) for k, v in model.state_dict().items())


def test_resume_is_exact_with_evaluation_and_selection_in_process(tmp_path):
    dev = dev_loss_fn(toy_examples(8, seed=5))
    kw = dict(eval_every=2, eval_fn=dev, select_metric="dev_loss", select_mode="min",
              restore_best=True, checkpoint_every=3)
    ref_model, ref_proj, ref = _run(tmp_path, checkpointer=CheckpointDir(tmp_path / "a"), **kw)
    ckpt = CheckpointDir(tmp_path / "b")
    _, _, part = _run(tmp_path, checkpointer=ckpt, max_steps=7, **kw)
    assert part.steps_done == 7 and ckpt.steps() == [6, 7]
    model, proj, resumed = _run(tmp_path, checkpointer=ckpt, resume=True, **kw)
    assert resumed.resumed_from == 7
    assert without_seconds(resumed.history) == without_seconds(ref.history)
    assert (resumed.best_step, resumed.best_metric) == (ref.best_step, ref.best_metric)
    assert ref.best_step is not None
    for a, b in zip(list(model.parameters()) + list(proj.parameters()),
                    list(ref_model.parameters()) + list(ref_proj.parameters()), strict=True):
        assert torch.equal(a, b)


def test_a_best_state_saved_after_the_last_checkpoint_survives_a_crash(tmp_path):
    """Killed after an improvement was saved but before the next checkpoint, then resumed with
    an evaluation that does not give the same number again (sampled generation): the saved
    best state stays the best, and is what restore_best loads."""
    first = {3: 1.0, 6: 5.0}
    replay = {6: 0.0, 9: 0.5, 12: 0.5}
    weights_at = {}

    def eval_from(table):
        def eval_fn(model, step):
            weights_at.setdefault(step, {k: v.clone() for k, v in model.state_dict().items()})
            return {"score": table[step]}
        return eval_fn

    def crash_at_6(record):
        if record["step"] == 6:
            raise KeyboardInterrupt("killed")

    ckpt = CheckpointDir(tmp_path / "ckpt")
    kw = dict(eval_every=3, select_metric="score", checkpointer=ckpt, checkpoint_every=4)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, eval_fn=eval_from(first), on_log=crash_at_6, **kw)
    assert ckpt.steps() == [4] and ckpt.load_best()[0] == 6
    model, _, res = _run(tmp_path, eval_fn=eval_from(replay), resume=True, restore_best=True, **kw)
    assert res.resumed_from == 4 and (res.best_step, res.best_metric) == (6, 5.0)
    assert all(torch.equal(v, weights_at[6][k]) for k, v in model.state_dict().items())


def test_resume_refuses_a_planted_malicious_checkpoint(tmp_path):
    """A pickle that would run code when unpickled, planted as the newest checkpoint, is
    refused by name and never runs."""
    ckpt = tmp_path / "ckpt"
    _run(tmp_path, checkpointer=CheckpointDir(ckpt), checkpoint_every=4, max_steps=8)
    marker = tmp_path / "pwned"
    planted = ckpt / "step-000000011.pt"
    torch.save({"step": 11, "payload": RunsCode(marker)}, planted)
    # The plant is live: loading it the unsafe way would run its code.
    torch.load(planted, weights_only=False)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UnsafeCheckpointError) as err:
        _run(tmp_path, checkpointer=CheckpointDir(ckpt), checkpoint_every=4, resume=True)
    assert str(planted) in str(err.value) and "delete it" in str(err.value)
    assert not marker.exists()


class RunsCode:
    """Unpickling this object creates ``marker`` (through os.system): a stand-in for code
    planted in a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_move_to_device_moves_tensors_in_nested_batches():
    @dataclasses.dataclass
    class Part:
        x: torch.Tensor
        ids: tuple[int, ...]
        mask: torch.Tensor | None = None

    batch = ({"standard": Part(torch.ones(2), (1, 2), torch.zeros(2)), "cot": None},
             [torch.arange(3), "text"], 7)
    moved = move_to_device(batch, "meta")
    part = moved[0]["standard"]
    assert isinstance(part, Part) and part.x.is_meta and part.mask.is_meta and part.ids == (1, 2)
    assert moved[0]["cot"] is None and moved[1][0].is_meta and moved[1][1] == "text"
    assert isinstance(moved[1], list) and moved[2] == 7
    assert batch[0]["standard"].x.device.type == "cpu"  # the input is not modified


def _run(tmp_path, **kwargs):
    torch.manual_seed(0)
    model = TinyLM()
    projector = torch.nn.Linear(16, 4)

    def loss_fn(m, batch):
        return sft_loss(m, batch) + projector(m.hidden(batch["input_ids"])).pow(2).mean()

    result = train(
        model, loss_fn, toy_examples(), steps=12, batch_size=5, lr=1e-2, collate_fn=collate,
        extra_param_groups=[{"params": projector.parameters(), "lr": 3e-2}], seed=7, **kwargs,
    )
    return model, projector, result


def test_checkpoints_keep_the_last_k_and_resume_exactly_in_process(tmp_path):
    ref_model, ref_proj, ref = _run(tmp_path)
    ckpt = tmp_path / "ckpt"
    _, _, part = _run(tmp_path, checkpointer=CheckpointDir(ckpt, keep_last=2), checkpoint_every=2,
                      max_steps=7)
    assert part.steps_done == 7
    assert [s for s, _ in list_checkpoints(ckpt)] == [6, 7]  # every 2 steps, the stop, the last 2 kept
    assert not [p for p in ckpt.iterdir() if ".tmp-" in p.name]
    model, proj, resumed = _run(tmp_path, checkpointer=CheckpointDir(ckpt, keep_last=2),
                                checkpoint_every=2, resume=True)
    assert resumed.resumed_from == 7 and resumed.steps_done == 12
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in ref.history]
    got = list(model.parameters()) + list(proj.parameters())
    want = list(ref_model.parameters()) + list(ref_proj.parameters())
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert [s for s, _ in list_checkpoints(ckpt)] == [10, 12]  # the final checkpoint is kept
    # a finished run resumes to nothing; different settings refuse the checkpoint
    _, _, again = _run(tmp_path, checkpointer=CheckpointDir(ckpt), resume=True)
    assert again.resumed_from == 12 and len(again.history) == 12
    with pytest.raises(ValueError, match="checkpoint"):
        train(TinyLM(), sft_loss, toy_examples(), steps=12, batch_size=4, lr=1e-2, collate_fn=collate,
              checkpointer=CheckpointDir(ckpt), resume=True)


def without_seconds(history):
    """A history without its wall times (the only field that differs between two runs)."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def dev_loss_fn(dev_rows):
    """An evaluation hook: mean SFT loss on held-out rows (dropout off: the loop sets eval mode)."""
    batch = collate(dev_rows)

    def eval_fn(model, step):
        assert not model.training and not torch.is_grad_enabled()
        return {"dev_loss": float(sft_loss(model, batch))}

    return eval_fn


# A child process that trains with a checkpoint every 3 steps and slow steps (so that the
# parent can kill it mid-run), evaluates every 4 steps, keeps the best state by dev loss and
# restores it at the end, then writes its final weights.
CHILD = textwrap.dedent(
    """
    import sys, time, torch
    sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    from test_training import TinyLM, toy_examples, collate, dev_loss_fn
    from cot2align_core.training import train, sft_loss
    from storage.checkpoints import CheckpointDir
    out, ckpt, resume, delay = sys.argv[1], sys.argv[2], sys.argv[3] == "1", float(sys.argv[4])
    torch.manual_seed(0)
    model, projector = TinyLM(), torch.nn.Linear(16, 4)
    def loss_fn(m, batch):
        ce = sft_loss(m, batch)
        return ce + projector(m.hidden(batch["input_ids"])).pow(2).mean(), {{"ce": ce}}
    result = train(model, loss_fn, toy_examples(40), steps=40, batch_size=6, lr=1e-2, collate_fn=collate,
                   extra_param_groups=[{{"module": projector, "lr": 3e-2}}], seed=11,
                   checkpointer=CheckpointDir(ckpt, keep_last=2), checkpoint_every=3,
                   eval_every=4, eval_fn=dev_loss_fn(toy_examples(12, seed=5)),
                   select_metric="dev_loss", select_mode="min", restore_best=True,
                   resume=resume, on_log=lambda r: time.sleep(delay))
    torch.save({{"model": model.state_dict(), "projector": projector.state_dict(),
                "history": result.history, "resumed_from": result.resumed_from,
                "best": (result.best_step, result.best_metric)}}, out)
    """
)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_the_same_weights(tmp_path):
    """With evaluation hooks and best-state selection on: the killed-and-resumed run ends with
    the same history (metrics included), best step and restored best weights."""
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(repo=str(REPO), tests=str(Path(__file__).parent)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    def run(*args):
        subprocess.run([sys.executable, str(script), *map(str, args)], env=env, check=True, timeout=300)

    # Killed: started, SIGKILLed once it has written the checkpoint of step 9 (steps are slow).
    ckpt = tmp_path / "ckpt"
    child = subprocess.Popen([sys.executable, str(script), tmp_path / "killed.pt", ckpt, "0", "0.2"], env=env)
    deadline = time.monotonic() + 240
    while not any(s >= 9 for s, _ in list_checkpoints(ckpt)):
        assert child.poll() is None, "the child ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint came"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL
    assert not (tmp_path / "killed.pt").exists()
    killed_at = list_checkpoints(ckpt)[-1][0]
    assert 9 <= killed_at < 40 and (ckpt / "best.pt").exists()

    run(tmp_path / "resumed.pt", ckpt, "1", "0")
    run(tmp_path / "straight.pt", tmp_path / "ckpt_straight", "0", "0")
    resumed = torch.load(tmp_path / "resumed.pt")
    straight = torch.load(tmp_path / "straight.pt")
    assert resumed["resumed_from"] == killed_at
    assert without_seconds(resumed["history"]) == without_seconds(straight["history"])
    assert len(straight["history"]) == 40
    assert [r["step"] for r in straight["history"] if "dev_loss" in r] == list(range(4, 41, 4))
    best_step, best_metric = straight["best"]
    assert resumed["best"] == straight["best"]
    assert best_metric == min(r["dev_loss"] for r in straight["history"] if "dev_loss" in r)
    for part in ("model", "projector"):
        for name, tensor in straight[part].items():
            assert torch.equal(resumed[part][name], tensor), name
    assert math.isfinite(straight["history"][-1]["loss"])
