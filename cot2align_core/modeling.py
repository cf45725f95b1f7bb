"""Tokenizers trained on the spot, models built from configs, and loading of pretrained ones.

The demo distills between two models that share nothing but the task text: a teacher with a
byte-level BPE tokenizer and a smaller student with a unigram (SentencePiece-style) one, each
with its own vocabulary size. Both are built from transformers configs (no downloads) and are
saved with `save_pretrained`, so the rest of the pipeline (and vLLM) loads them like any other
model directory.

Every tokenizer made here has the same special tokens at the same ids
(`<pad>`=0, `<s>`=1, `</s>`=2, `<unk>`=3) and a post-processor that puts `<s>` in front of
every encoded text (`add_special_tokens=True`, which is also what vLLM does with a prompt).
`</s>` is never added by the tokenizer: SFT examples append it to the response themselves.
"""
from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]  # ids 0, 1, 2, 3 in every tokenizer made here
TOKENIZER_KINDS = ("bpe", "unigram", "wordpiece", "char")
ARCHS = ("llama", "gpt2")

# Runs of digits are their own pre-tokens: a number is never merged with the text around it,
# so "12" is tokenized the same way wherever it stands.
_DIGIT_RUNS = pre_tokenizers.Split(Regex(r"\d+"), behavior="isolated")
# A prefix no byte-level character can produce (U+2581 is not in the byte-level alphabet), so
# decoding can strip it without touching text such as "###".
_WORDPIECE_PREFIX = "\u2581\u2581"


def _random_windows(texts: list[str], count: int = 500, seed: int = 0) -> list[str]:
    """`count` random substrings of the texts, added to the unigram trainer's corpus.

    The tokenizers unigram trainer seeds its candidate pieces with substrings that repeat
    across *distinct* pre-tokens, so a template present in identical copies in every text is
    never seeded (the trained vocabulary stays near single characters: 136 pieces and 150
    tokens per demo CoT example, measured; 56 with 300 windows, 50 with 4000 but 30x slower).
    Windows cut at random places make those spans repeat across distinct strings.
    """
    rng = random.Random(seed)
    windows = []
    for _ in range(count):
        text = texts[rng.randrange(len(texts))]
        i = rng.randrange(len(text))
        windows.append(text[i : rng.randrange(i + 1, len(text) + 1)])
    return windows


def _build_backend(texts: list[str], kind: str, vocab_size: int, max_piece_length: int) -> Tokenizer:
    if kind == "bpe":
        # Byte-level BPE without GPT-2's word-splitting regex: merges may cross spaces, so
        # the fixed prompt templates become a handful of long tokens; digits stay apart.
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [_DIGIT_RUNS, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    elif kind == "unigram":
        # SentencePiece-style unigram over the text with spaces as "\u2581", not split at spaces
        # (split=False) so that pieces may span words, up to max_piece_length characters.
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [_DIGIT_RUNS, pre_tokenizers.Metaspace(prepend_scheme="never", split=False)]
        )
        tok.decoder = decoders.Metaspace(prepend_scheme="never", split=False)
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,
            unk_token=UNK,
            max_piece_length=max_piece_length,
            show_progress=False,
        )
    elif kind == "wordpiece":
        # WordPiece over GPT-2 style byte-level words (spaces and newlines kept as bytes, so
        # decoding is exact); continuation pieces carry a prefix that decoding strips.
        tok = Tokenizer(
            models.WordPiece(unk_token=UNK, continuing_subword_prefix=_WORDPIECE_PREFIX)
        )
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.Sequence(
            [decoders.Replace(Regex("^" + _WORDPIECE_PREFIX), ""), decoders.ByteLevel()]
        )
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            continuing_subword_prefix=_WORDPIECE_PREFIX,
            show_progress=False,
        )
    elif kind == "char":
        # One token per character: the most frequent characters up to vocab_size, others <unk>.
        counts = Counter(ch for text in texts for ch in text)
        chars = [ch for ch, _ in counts.most_common(max(vocab_size - len(SPECIAL_TOKENS), 0))]
        vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + sorted(chars))}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK, fuse_unk=True))
        tok.decoder = decoders.Fuse()
        trainer = None
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}: expected one of {TOKENIZER_KINDS}")
    if trainer is not None:
        corpus = texts + _random_windows(texts, min(2 * len(texts), 500)) if kind == "unigram" else texts
        tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def train_tokenizer(
    texts: Iterable[str],
    kind: str,
    vocab_size: int,
    out_dir: str | os.PathLike | None = None,
    *,
    model_max_length: int = 512,
    max_piece_length: int = 16,
) -> PreTrainedTokenizerFast:
    """Train a tokenizer of `kind` on `texts` and wrap it as a transformers tokenizer.

    kind: "bpe" (byte-level BPE, no unknown tokens), "unigram" (SentencePiece-style),
    "wordpiece" (over byte-level words), "char" (one token per character seen in `texts`).
    vocab_size counts the 4 special tokens; trainers may stop below it on a small corpus.
    max_piece_length: longest unigram piece, in characters.

    Train it on texts that contain the prompt templates (whole formatted examples) so that the
    fixed English of the templates becomes few tokens. When `out_dir` is given the tokenizer
    is saved there (`save_pretrained`) and loads offline with `AutoTokenizer.from_pretrained`.
    """
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("train_tokenizer needs at least one non-empty text")
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens")
    backend = _build_backend(texts, kind, vocab_size, max_piece_length)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def load_tokenizer(path_or_hub_id: str | os.PathLike) -> PreTrainedTokenizerFast:
    """AutoTokenizer.from_pretrained, with an error that names a missing local path."""
    _check_local_path(path_or_hub_id, "tokenizer")
    return AutoTokenizer.from_pretrained(str(path_or_hub_id))


def build_model(
    arch: str,
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = True,
    dropout: float = 0.0,
    seed: int | None = 0,
) -> PreTrainedModel:
    """A randomly initialised causal LM of `arch` ("llama" or "gpt2") sized for `tokenizer`.

    vocab_size and the pad/bos/eos ids come from the tokenizer (also set in the generation
    config, so greedy `generate` stops at `</s>`). head_dim = hidden_size / num_heads: keep it
    at 64 or more for a model that vLLM's CPU attention kernels must run (they reject 16).
    intermediate_size defaults to 4 x hidden (gpt2) or the Llama ratio 8/3 x hidden rounded up
    to a multiple of 32. `seed` makes the initialisation reproducible (None: torch's state).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}: expected one of {ARCHS}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    ids = dict(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    if arch == "llama":
        if intermediate_size is None:
            intermediate_size = -(-8 * hidden_size // 3 // 32) * 32
        config = LlamaConfig(
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            max_position_embeddings=max_position_embeddings,
            attention_dropout=dropout,
            **ids,
        )
        model_cls = LlamaForCausalLM
    else:
        config = GPT2Config(
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_inner=intermediate_size,
            n_positions=max_position_embeddings,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
            **ids,
        )
        model_cls = GPT2LMHeadModel
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = model_cls(config)
    else:
        model = model_cls(config)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(model.generation_config, key, ids[key])
    return model


def count_parameters(model: torch.nn.Module, *, exclude_embeddings: bool = False) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    skip = set()
    if exclude_embeddings:
        skip = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    seen = {id(p): p.numel() for p in model.parameters() if id(p) not in skip}
    return sum(seen.values())


def _check_local_path(path_or_hub_id: str | os.PathLike, what: str) -> None:
    """Raise FileNotFoundError for something that is meant as a local path but is missing.

    A hub id is "name" or "org/name"; anything absolute, starting with "." or "~", with a
    backslash or with more than one "/" is taken as a path.
    """
    s = str(path_or_hub_id)
    if os.path.exists(os.path.expanduser(s)):
        return
    looks_like_path = (
        isinstance(path_or_hub_id, os.PathLike)
        or s.startswith(("/", ".", "~"))
        or "\\" in s
        or s.count("/") > 1
    )
    if looks_like_path:
        raise FileNotFoundError(
            f"{what} path {s!r} does not exist. Point the config at a directory written by "
            f"save_pretrained (for the teacher: run the teacher_sft stage first, or set the "
            f"model to a Hugging Face hub id that is cached on this machine)."
        )


def load_model(
    path_or_hub_id: str | os.PathLike,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
) -> PreTrainedModel:
    """Load a pretrained causal LM (a save_pretrained directory or a hub id), in eval mode.

    dtype: "float32", "bfloat16", "float16" or a torch dtype. A local path that does not exist
    raises FileNotFoundError naming it; a hub id that cannot be fetched (these machines are
    offline) raises OSError saying so.
    """
    _check_local_path(path_or_hub_id, "model")
    if isinstance(dtype, str):
        try:
            dtype = getattr(torch, dtype)
        except AttributeError:
            raise ValueError(f"unknown dtype {dtype!r}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path_or_hub_id), dtype=dtype)
    except OSError as err:
        raise OSError(
            f"could not load model {str(path_or_hub_id)!r}: it is not a local directory, and "
            f"as a hub id it is neither cached nor downloadable here "
            f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}). "
            f"Download it on a connected machine or give a save_pretrained directory. ({err})"
        ) from err
    return model.to(device).eval()
