"""Tokenizers trained here, models built from configs, loading of saved ones."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from cot2align_core.demo_task import DEMO_DEFAULTS, make_demo_rows
from cot2align_core.modeling import (
    SPECIAL_TOKENS,
    TOKENIZER_KINDS,
    build_model,
    count_parameters,
    load_model,
    load_tokenizer,
    train_tokenizer,
)
from cot2align_core.prompts import format_cot, format_standard
from cot2align_core.sft_data import tokenizer_corpus


@pytest.fixture(scope="module")
def corpus():
    return tokenizer_corpus(make_demo_rows(200, seed=0))


@pytest.fixture(scope="module")
def demo_tokenizers(corpus, tmp_path_factory):
    out = {}
    for side in ("teacher", "student"):
        spec = DEMO_DEFAULTS[f"{side}_tokenizer"]
        out[side] = train_tokenizer(corpus, out_dir=tmp_path_factory.mktemp(side), **spec)
    return out


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_tokenizer_saves_loads_offline_and_round_trips(kind, corpus, tmp_path):
    tok = train_tokenizer(corpus, kind, 400, tmp_path, model_max_length=256)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert loaded.is_fast and loaded.model_max_length == 256
    assert [loaded.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id, loaded.unk_token_id) == (0, 1, 2, 3)
    assert len(loaded) <= 400
    row = make_demo_rows(1, seed=9, split="test")[0]
    for prompt, response in (format_standard(row), format_cot(row)):
        ids = loaded(prompt)["input_ids"]
        assert ids == tok(prompt)["input_ids"]
        assert ids[0] == loaded.bos_token_id and loaded.eos_token_id not in ids  # <s> only
        plain = loaded(response, add_special_tokens=False)["input_ids"]
        assert loaded.unk_token_id not in ids + plain
        assert loaded.decode(plain) == response  # exact, newlines and spaces included
        assert loaded.decode(ids, skip_special_tokens=True) == prompt
    # batches pad with <pad> on the side asked for
    loaded.padding_side = "left"
    batch = loaded(["7 + 1", "7 + 1 - 3"], padding=True)
    assert batch["input_ids"][0][0] == loaded.pad_token_id and batch["attention_mask"][0][0] == 0


def test_unknown_kind_and_empty_corpus_are_refused(corpus):
    with pytest.raises(ValueError, match="kind"):
        train_tokenizer(corpus, "sentencepiece", 100)
    with pytest.raises(ValueError):
        train_tokenizer([], "bpe", 100)


def test_demo_tokenizers_differ_and_learn_the_templates_as_few_tokens(demo_tokenizers):
    teacher, student = demo_tokenizers["teacher"], demo_tokenizers["student"]
    assert teacher.get_vocab() != student.get_vocab() and len(teacher) != len(student)
    row = make_demo_rows(1, seed=1, split="test")[0]
    prompt, response = format_cot(row)
    # ~240 characters of CoT prompt template: a handful of BPE tokens, a few dozen unigram ones
    assert len(teacher(prompt)["input_ids"]) <= 10
    assert len(student(prompt)["input_ids"]) <= 40
    assert teacher.tokenize(response) != student.tokenize(response)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_build_model_takes_vocab_and_special_ids_from_the_tokenizer(arch, demo_tokenizers, tmp_path):
    tok = demo_tokenizers["teacher"]
    model = build_model(arch, tok, hidden_size=64, num_layers=2, num_heads=1, seed=3)
    cfg = model.config
    assert cfg.vocab_size == len(tok)
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (0, 1, 2)
    assert model.generation_config.eos_token_id == 2 and model.generation_config.pad_token_id == 0
    same = build_model(arch, tok, hidden_size=64, num_layers=2, num_heads=1, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), same.parameters()))

    ids = tok(["7 + 1 - 3", "2 + 2"], padding=True, return_tensors="pt")
    logits = model(**ids).logits
    assert logits.shape == (2, ids["input_ids"].shape[1], len(tok))

    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert not loaded.training and type(loaded) is type(model)
    with torch.no_grad():
        assert torch.allclose(loaded(**ids).logits, model.eval()(**ids).logits, atol=1e-6)
    assert load_model(str(tmp_path / "m"), dtype="bfloat16").dtype == torch.bfloat16
    assert load_tokenizer(tmp_path / "m")("2 + 2")["input_ids"] == tok("2 + 2")["input_ids"]


def test_demo_student_is_smaller_than_the_teacher(demo_tokenizers):
    teacher = build_model(tokenizer=demo_tokenizers["teacher"], **DEMO_DEFAULTS["teacher"])
    student = build_model(tokenizer=demo_tokenizers["student"], **DEMO_DEFAULTS["student"])
    assert count_parameters(student) < count_parameters(teacher)
    for model in (teacher, student):  # vLLM's CPU attention needs head_dim >= 64 (not 16)
        cfg = model.config
        assert cfg.hidden_size // cfg.num_attention_heads >= 64


def test_generate_stops_at_eos(demo_tokenizers):
    tok = demo_tokenizers["teacher"]
    model = build_model("llama", tok, hidden_size=64, num_layers=1, num_heads=1)
    bonus = torch.zeros(len(tok))
    bonus[tok.eos_token_id] = 1e4  # make </s> the token the model always predicts
    model.lm_head.register_forward_hook(lambda module, args, out: out + bonus)
    ids = tok("7 + 1", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out[0, -1].item() == tok.eos_token_id and out.shape[1] <= ids["input_ids"].shape[1] + 1


def test_missing_paths_are_named(tmp_path):
    missing = tmp_path / "teacher_sft" / "final"
    with pytest.raises(FileNotFoundError, match="teacher_sft/final"):
        load_model(missing)
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        load_model(f"./{missing.name}/model")
    with pytest.raises(FileNotFoundError):
        load_tokenizer(str(missing))
    with pytest.raises(OSError, match="hub id"):
        load_model("no-such-org/no-such-model-cot2align")
    with pytest.raises(ValueError):
        build_model("t5", None)
