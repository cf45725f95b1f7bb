"""Generation backends (cot2align_core.generation) on a tiny Llama built here.

The model: LlamaConfig hidden 128, 2 heads (head_dim 64: vLLM's CPU attention rejects 16),
2 layers, a byte-level BPE tokenizer trained on synthetic sentences (only the characters
seen, so every token decodes to ASCII and texts compare exactly across backends), random
weights with initializer_range 0.1 (peaked enough logits that greedy decoding is not a
near-tie, and varied outputs). vLLM tests start ONE in-process engine for the module
(about 3 s with enforce_eager on CPU, after about 10 s of import).
"""
from __future__ import annotations

import importlib.util
import random
import threading

import pytest
import torch

from cot2align_core.generation import (
    Completion,
    GenerationBackend,
    HFBackend,
    SamplingConfig,
    VLLMBackend,
    derive_seed,
    make_backend,
    resolve_backend_kind,
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
    with HFBackend(tiny_dir, batch_size=4) as backend:
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
    with HFBackend(tiny_dir, batch_size=1) as single:
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
    backend = make_backend("auto", model, tokenizer=tok, batch_size=3)
    assert isinstance(backend, HFBackend)
    out = backend.generate(PROMPTS, GREEDY)
    assert [c[0].token_ids for c in out] == [c[0].token_ids for c in hf_greedy]
    assert model.training and tok.padding_side == AutoTokenizer.from_pretrained(tiny_dir).padding_side
    backend.close()
    assert sum(p.numel() for p in model.parameters()) > 0  # caller's model is not freed
    with pytest.raises(ValueError, match="tokenizer"):
        HFBackend(model)


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
    with HFBackend(tiny_dir, max_model_len=40) as b:
        n_long = len(b.tokenizer(long_prompt)["input_ids"])
        assert n_long > 30
        out = b.generate(prompts, s, ids=["a", "b"])
        (issue,) = b.last_prompt_report.truncated
        assert (issue.index, issue.id, issue.num_tokens, issue.kept_tokens) == (1, "b", n_long, 30)
        assert len(out[1]) == 1 and out[1][0].num_tokens <= 10
        # the truncated prompt is BOS + the last 29 tokens
        ids = b.tokenizer(long_prompt)["input_ids"]
        direct = b._generate_token_prompts([[ids[0]] + ids[-29:]], s, [0])
        assert direct[0][0].token_ids == out[1][0].token_ids
    with HFBackend(tiny_dir, max_model_len=40, prompt_overflow="skip") as b:
        out = b.generate(prompts, s, ids=["a", "b"])
        assert out[1] == [] and len(out[0]) == 1
        assert [i.id for i in b.last_prompt_report.skipped] == ["b"]
    with HFBackend(tiny_dir, max_model_len=40, prompt_overflow="error") as b:
        with pytest.raises(ValueError, match=r"#1 \(id b\)"):
            b.generate(prompts, s, ids=["a", "b"])
        with pytest.raises(ValueError, match="no room"):
            b.generate(prompts, SamplingConfig(max_tokens=40))
    with HFBackend(tiny_dir, max_prompt_tokens=8) as b:
        b.generate(prompts, s)
        assert [i.index for i in b.last_prompt_report.truncated] == [1]


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
    # (auto -> vllm for a supported model is checked by the vLLM tests: their engine is built
    # with make_backend("auto", ...); checking it here would import vllm, about 10 s.)
    assert resolve_backend_kind("hf", tiny_dir) == ("hf", "requested")
    assert resolve_backend_kind("vllm", tiny_dir) == ("vllm", "requested")

    with make_backend("hf", tiny_dir, dtype="float32", batch_size=2) as b:
        assert isinstance(b, HFBackend) and b.batch_size == 2
    with pytest.raises(TypeError, match="gpu_memory_utilization"):
        make_backend("hf", tiny_dir, gpu_memory_utilization=0.2)

    if not torch.cuda.is_available():
        # head_dim 16: vLLM's CPU attention rejects it, so "auto" falls back to HF and drops
        # the vLLM-only option with a log line.
        small = _build_model(tmp_path / "headdim16", hidden=32, heads=2)
        kind, reason = resolve_backend_kind("auto", small)
        assert kind == "hf" and ("head_dim 16" in reason or "not installed" in reason)
        with make_backend("auto", small, gpu_memory_utilization=0.2, hf_options={"batch_size": 3}) as b:
            assert isinstance(b, HFBackend) and b.batch_size == 3


# --------------------------------------------------------------------------------------------
# vLLM (CPU build here), one engine per module
# --------------------------------------------------------------------------------------------


class _Engine:
    """Holds the module's vLLM engine; a test may replace it (restart) without breaking the
    others, whatever the order."""

    def __init__(self, tiny_dir):
        self.tiny_dir = tiny_dir
        self.backend = None

    def start(self, kind="auto"):
        self.backend = make_backend(kind, self.tiny_dir, dtype="float32", max_model_len=MAX_MODEL_LEN)
        return self.backend

    def get(self):
        return self.backend if self.backend is not None else self.start()


@pytest.fixture(scope="module")
def engine(tiny_dir):
    if not HAS_VLLM:
        pytest.skip("vllm is not installed (pip install .[cpu])")
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # installed but broken (e.g. a torch mismatch)
        pytest.skip(f"vllm is installed but not importable: {type(exc).__name__}: {exc}")
    holder = _Engine(tiny_dir)
    yield holder
    if holder.backend is not None:
        holder.backend.close()


@pytest.mark.slow
@needs_vllm
def test_vllm_greedy_matches_hf(engine, hf_greedy):
    backend = engine.get()  # built by make_backend("auto", ...)
    assert isinstance(backend, VLLMBackend) and backend.max_model_len == MAX_MODEL_LEN
    assert resolve_backend_kind("auto", engine.tiny_dir)[0] == "vllm"
    if backend.on_cpu:
        assert backend.engine_kwargs["enforce_eager"] is True
        assert backend.engine_kwargs["gpu_memory_utilization"] == 0.2
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
def test_vllm_restart_in_thread_and_process_state(engine):
    """close() frees the engine; a new one starts in a non-main thread (as in a Prefect task
    runner) in the same process, gives the same results, and the process keeps control of
    torch's thread count."""
    first = engine.get()
    s = SamplingConfig(temperature=1.0, max_tokens=12)
    before = first.generate(PROMPTS[:2], s, seeds=[3, 4])
    first.close()
    first.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        first.generate(PROMPTS[:1], s)
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
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    assert torch.get_num_threads() == 1  # not swallowed by vLLM's CPU worker patch
    torch.set_num_threads(n)
