"""Tokenizers trained here, models built from configs, loading of saved ones."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from cot2align_core.demo_task import DEMO_DEFAULTS, make_demo_rows
from cot2align_core.modeling import (
    SPECIAL_TOKENS,
    ModelFilesError,
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


@pytest.fixture()
def saved(tmp_path, demo_tokenizers):
    """A tiny model and its tokenizer saved under tmp_path/models/m."""
    tok = demo_tokenizers["teacher"]
    folder = tmp_path / "models" / "m"
    build_model("llama", tok, hidden_size=64, num_layers=1, num_heads=1).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_a_folder_without_tokenizer_files_names_them(saved):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (saved / name).unlink()
    with pytest.raises(ModelFilesError) as info:
        load_tokenizer(saved)
    msg = str(info.value)
    assert str(saved) in msg and "has no tokenizer.json / tokenizer.model / vocab files" in msg
    assert "tokenizer.save_pretrained" in msg
    assert isinstance(info.value, FileNotFoundError)  # the CLI prints it without a traceback


def test_a_missing_relative_path_is_neither_a_folder_nor_a_cached_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for load in (load_model, load_tokenizer):
        with pytest.raises(ModelFilesError) as info:
            load("models/nope")
        msg = str(info.value)
        assert "'models/nope' is neither an existing folder" in msg
        assert str(tmp_path / "models" / "nope") in msg and "cached on this machine" in msg
        assert "HF_HUB_OFFLINE" in msg and info.value.__cause__ is None and info.value.__context__ is None


def test_local_paths_never_go_to_the_hub(saved, tmp_path, monkeypatch):
    import huggingface_hub
    import transformers.utils.hub

    def no_hub(*args, **kwargs):
        raise AssertionError(f"the hub was asked for {args} {kwargs}")

    for module in (huggingface_hub, transformers.utils.hub):
        monkeypatch.setattr(module, "hf_hub_download", no_hub)
        monkeypatch.setattr(module, "snapshot_download", no_hub)
    monkeypatch.chdir(tmp_path)  # "models/m" reads like a hub id (org/name) but exists here
    assert load_model("models/m").config.num_hidden_layers == 1
    assert load_tokenizer("models/m")("2 + 2")["input_ids"][0] == 1


def test_pickle_weights_are_refused(saved):
    from cot2align_core.generation import HFBackend

    state = load_model(saved).state_dict()
    for f in saved.glob("*.safetensors"):
        f.unlink()
    torch.save(state, saved / "pytorch_model.bin")
    for load in (load_model, HFBackend):
        with pytest.raises(ModelFilesError) as info:
            load(saved)
        msg = str(info.value)
        assert "pytorch_model.bin" in msg and "unpickle" in msg and "model.safetensors" in msg
    (saved / "pytorch_model.bin").unlink()
    with pytest.raises(ModelFilesError, match="no model weights"):
        load_model(saved)


def test_trained_tokenizers_end_a_pre_token_at_the_end_of_every_prompt(tmp_path):
    """Encoding prompt + response jointly gives the prompt's own tokens, then the response's:
    no token spans the boundary (tokenization.py relies on it), for every kind, even where
    the training texts make merges such as "\\nThe" frequent."""
    import random

    from cot2align_core.prompts import format_row

    rng = random.Random(0)
    words = "the sky sea is blue green red wide deep calm this that answer".split()
    rows = [{"id": str(i), "instruction": f"Describe the {rng.choice(words)}",
             "input": " ".join(rng.choices(words, k=rng.randint(0, 6))),
             "output": "The " + " ".join(rng.choices(words, k=5)),
             "rationale": "This is " + " ".join(rng.choices(words, k=4))} for i in range(150)]
    texts = tokenizer_corpus(rows)
    for kind in TOKENIZER_KINDS:
        tok = train_tokenizer(texts, kind, 400, tmp_path / kind)
        for row in rows[:40]:
            for form in ("standard", "cot"):
                prompt, response = format_row(row, form)
                joint = tok(prompt + response, add_special_tokens=False)["input_ids"]
                apart = tok(prompt, add_special_tokens=False)["input_ids"] + tok(response, add_special_tokens=False)["input_ids"]
                assert joint == apart, (kind, row["id"], form)
