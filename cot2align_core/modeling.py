"""Tokenizers trained on the spot, models built from configs, and loading of pretrained ones.

The demo distills between two models that share nothing but the task text: a teacher with a
byte-level BPE tokenizer and a smaller student with a unigram (SentencePiece-style) one, each
with its own vocabulary size. Both are built from transformers configs (no downloads) and are
saved with `save_pretrained`, so the rest of the pipeline (and vLLM) loads them like any other
model directory.

Every tokenizer made here has the same special tokens at the same ids
(`<pad>`=0, `<s>`=1, `</s>`=2, `<unk>`=3) and a post-processor that puts `<s>` in front of
every encoded text (`add_special_tokens=True`; generation backends put it in front of a prompt
the same way). `</s>` is never added by the tokenizer: SFT examples append it to the response
themselves. The end of every prompt template ends a pre-token, so no token spans a prompt and
its response (see `cot2align_core.tokenization`).

Loading (`load_model`, `load_tokenizer`): a path that exists locally is read from disk and never
sent to the hub; a hub id is read from the local cache (downloaded only when `HF_HUB_OFFLINE` is
unset); anything else is a `ModelFilesError` (a FileNotFoundError) that says which it was not.
Weights load from safetensors only and no remote code runs: a folder with only a pickle
`pytorch_model.bin` is refused, since loading it would run code stored in the file.
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

from cot2align_core.prompts import PROMPT_END_REGEX

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]  # ids 0, 1, 2, 3 in every tokenizer made here
TOKENIZER_KINDS = ("bpe", "unigram", "wordpiece", "char")
ARCHS = ("llama", "gpt2")

# Runs of digits are their own pre-tokens: a number is never merged with the text around it,
# so "12" is tokenized the same way wherever it stands.
_DIGIT_RUNS = pre_tokenizers.Split(Regex(r"\d+"), behavior="isolated")
_PROMPT_END = pre_tokenizers.Split(Regex(PROMPT_END_REGEX), behavior="merged_with_previous")
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
        # Set after training (the vocabulary is the same as without it): the end of a prompt
        # template ends a pre-token, so encoding prompt + response jointly gives the prompt's
        # own tokens followed by the response's, as a generation engine sees them.
        tok.pre_tokenizer = pre_tokenizers.Sequence([_PROMPT_END, tok.pre_tokenizer])
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
    """A tokenizer from a local folder or a cached hub id (:func:`resolve_pretrained`), with
    no remote code. A folder without tokenizer files raises :class:`ModelFilesError` naming
    the files it lacks."""
    source = resolve_pretrained(path_or_hub_id, "tokenizer")
    if isinstance(source, Path):
        _check_tokenizer_files(source)
    return AutoTokenizer.from_pretrained(str(source), trust_remote_code=False)


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


class ModelFilesError(FileNotFoundError):
    """A model or tokenizer that cannot be loaded from what is on disk; the message names the
    path, what is missing and the fix."""


# A tokenizer folder needs one of these (file names as written by save_pretrained).
_TOKENIZER_FILES = (("tokenizer.json",), ("tokenizer.model",), ("spiece.model",),
                    ("vocab.json", "merges.txt"), ("vocab.txt",))


def _looks_like_hub_id(s: str) -> bool:
    """"name" or "org/name" (hub ids); anything absolute, starting with "." or "~", with a
    backslash or with more than one "/" is a path."""
    return not (s.startswith(("/", ".", "~")) or "\\" in s or s.count("/") > 1 or s.strip() != s or not s)


def resolve_pretrained(path_or_hub_id: str | os.PathLike, what: str) -> Path | str:
    """Where to load ``what`` ("model" or "tokenizer") from, without asking the hub for
    anything that exists locally.

    An existing local folder -> its Path. A hub id already in the local Hugging Face cache ->
    the cached snapshot's Path. A hub id not cached, when downloads are allowed
    (``HF_HUB_OFFLINE`` unset) -> the id (transformers downloads it). Anything else raises
    :class:`ModelFilesError` saying it was neither an existing folder nor a cached hub id.
    """
    s = os.path.expanduser(str(path_or_hub_id))
    if os.path.exists(s):
        if not os.path.isdir(s):
            raise ModelFilesError(f"{what} path {s!r} is a file; give the folder written by save_pretrained")
        return Path(s)
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if _looks_like_hub_id(s) and not isinstance(path_or_hub_id, os.PathLike):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(s, local_files_only=True))
        except Exception:  # not in the cache (or not a valid id)
            if not offline:
                return s
    raise ModelFilesError(
        f"{what} {s!r} is neither an existing folder (looked for {os.path.abspath(s)}) nor a "
        f"Hugging Face hub id cached on this machine"
        + (" (HF_HUB_OFFLINE is set: nothing is downloaded)" if offline else "")
        + ". Give the folder written by save_pretrained (for the teacher: run the teacher_sft "
        "stage first), or download the model on a connected machine into the cache.")


def _check_tokenizer_files(folder: Path) -> None:
    if any(all((folder / name).is_file() for name in group) for group in _TOKENIZER_FILES):
        return
    raise ModelFilesError(
        f"{folder} has no tokenizer.json / tokenizer.model / vocab files (vocab.json + "
        f"merges.txt, or vocab.txt): save the tokenizer there with "
        f"tokenizer.save_pretrained({str(folder)!r}), or point the config at the folder that "
        "holds the model's tokenizer.")


def _check_safetensors(folder: Path) -> None:
    """Refuse a local model folder without safetensors weights (a pickle checkpoint would run
    code when loaded)."""
    if not (folder / "config.json").is_file():
        raise ModelFilesError(f"{folder} has no config.json: give the folder written by "
                              "model.save_pretrained")
    if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file():
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise ModelFilesError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}); loading them would "
            "unpickle, that is run, code stored in the file, so they are not loaded. Convert "
            "them once, on a machine and with files you trust: "
            "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder) writes "
            "model.safetensors.")
    raise ModelFilesError(f"{folder} has no model weights (model.safetensors): save the model "
                          "there with model.save_pretrained")


def load_model(
    path_or_hub_id: str | os.PathLike,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
) -> PreTrainedModel:
    """Load a pretrained causal LM (a save_pretrained folder or a cached hub id), in eval mode.

    Weights load from safetensors only and no remote code runs (``use_safetensors=True``,
    ``trust_remote_code=False``): a folder with only a pickle ``pytorch_model.bin`` is refused
    with :class:`ModelFilesError`. dtype: "auto" (the checkpoint's), "float32", "bfloat16",
    "float16" or a torch dtype. Paths that do not resolve raise :class:`ModelFilesError`
    (:func:`resolve_pretrained`).
    """
    source = resolve_pretrained(path_or_hub_id, "model")
    if isinstance(source, Path):
        _check_safetensors(source)
    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16")
        dtype = getattr(torch, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=False)
    except OSError as err:
        raise ModelFilesError(f"could not load model {str(path_or_hub_id)!r} from {source}: {err}") from err
    return model.to(device).eval()
