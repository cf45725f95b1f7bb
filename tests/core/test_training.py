"""The training loop: batches, SFT loss, schedule, data order, checkpoints and exact resume."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from cot2align_core.training import (
    EpochShuffleSampler,
    collate_sft,
    list_checkpoints,
    lr_multiplier,
    sft_loss,
    train,
)

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


def test_sampler_order_depends_on_seed_and_epoch_only_and_resumes_mid_epoch():
    s = EpochShuffleSampler(10, 4, seed=3)
    batches = [s.next_batch() for _ in range(7)]  # 3 batches per epoch: 4, 4, 2
    assert [e for e, _ in batches] == [0, 0, 0, 1, 1, 1, 2]
    for epoch in (0, 1):
        seen = sorted(i for e, b in batches if e == epoch for i in b)
        assert seen == list(range(10))
    assert [b for e, b in batches if e == 0] != [b for e, b in batches if e == 1]
    resumed = EpochShuffleSampler(10, 4, seed=3)
    probe = EpochShuffleSampler(10, 4, seed=3)
    for _ in range(4):
        probe.next_batch()
    resumed.load_state_dict(probe.state_dict())
    assert [resumed.next_batch() for _ in range(3)] == batches[4:]
    assert EpochShuffleSampler(10, 4, seed=4).next_batch() != batches[0]
    assert EpochShuffleSampler(10, 4, drop_last=True).batches_per_epoch == 2


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
    with pytest.raises(ValueError):
        train(model, sft_loss, toy_examples(), batch_size=4, lr=1e-3)  # neither steps nor epochs
    with pytest.raises(ValueError):
        train(model, sft_loss, toy_examples(), steps=2, batch_size=4, lr=1e-3, checkpoint_every=1)
    with pytest.raises(FloatingPointError):
        train(model, lambda m, b: torch.tensor(float("nan"), requires_grad=True), toy_examples(),
              steps=2, batch_size=4, lr=1e-3, collate_fn=collate)


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
    _, _, part = _run(tmp_path, checkpoint_dir=ckpt, checkpoint_every=2, keep_last=2, max_steps=7)
    assert part.steps_done == 7
    assert [s for s, _ in list_checkpoints(ckpt)] == [6, 7]  # every 2 steps, the stop, the last 2 kept
    assert not [p for p in ckpt.iterdir() if p.name.endswith(".tmp")]
    model, proj, resumed = _run(tmp_path, checkpoint_dir=ckpt, checkpoint_every=2, keep_last=2, resume=True)
    assert resumed.resumed_from == 7 and resumed.steps_done == 12
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in ref.history]
    got = list(model.parameters()) + list(proj.parameters())
    want = list(ref_model.parameters()) + list(ref_proj.parameters())
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert [s for s, _ in list_checkpoints(ckpt)] == [10, 12]
    # a finished run resumes to nothing; different settings refuse the checkpoint
    _, _, again = _run(tmp_path, checkpoint_dir=ckpt, resume=True)
    assert again.resumed_from == 12 and len(again.history) == 12
    with pytest.raises(ValueError, match="checkpoint"):
        train(TinyLM(), sft_loss, toy_examples(), steps=12, batch_size=4, lr=1e-2, collate_fn=collate,
              checkpoint_dir=ckpt, resume=True)


# A child process that trains with a checkpoint every 3 steps and slow steps (so that the
# parent can kill it mid-run), then writes its final weights.
CHILD = textwrap.dedent(
    """
    import sys, time, torch
    sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    from test_training import TinyLM, toy_examples, collate
    from cot2align_core.training import train, sft_loss
    out, ckpt, resume, delay = sys.argv[1], sys.argv[2], sys.argv[3] == "1", float(sys.argv[4])
    torch.manual_seed(0)
    model, projector = TinyLM(), torch.nn.Linear(16, 4)
    def loss_fn(m, batch):
        ce = sft_loss(m, batch)
        return ce + projector(m.hidden(batch["input_ids"])).pow(2).mean(), {{"ce": ce}}
    result = train(model, loss_fn, toy_examples(40), steps=40, batch_size=6, lr=1e-2, collate_fn=collate,
                   extra_param_groups=[{{"module": projector, "lr": 3e-2}}], seed=11,
                   checkpoint_dir=ckpt if ckpt != "-" else None, checkpoint_every=3 if ckpt != "-" else 0,
                   keep_last=2,
                   resume=resume, on_log=lambda r: time.sleep(delay))
    torch.save({{"model": model.state_dict(), "projector": projector.state_dict(),
                "losses": [r["loss"] for r in result.history], "resumed_from": result.resumed_from}}, out)
    """
)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_the_same_weights(tmp_path):
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
    assert 9 <= killed_at < 40

    run(tmp_path / "resumed.pt", ckpt, "1", "0")
    run(tmp_path / "straight.pt", "-", "0", "0")
    resumed = torch.load(tmp_path / "resumed.pt")
    straight = torch.load(tmp_path / "straight.pt")
    assert resumed["resumed_from"] == killed_at
    assert resumed["losses"] == straight["losses"] and len(straight["losses"]) == 40
    for part in ("model", "projector"):
        for name, tensor in straight[part].items():
            assert torch.equal(resumed[part][name], tensor), name
    assert math.isfinite(straight["losses"][-1])
