"""Dual tokenisation: one example, two forms (standard, CoT), two tokenizers (teacher, student).

A sequence is the tokenization of the joint text ``prompt + response``, as the model reads it
and as it writes it when it generates the response itself: the text is encoded once, and each
token goes to the prompt or to the response by its character offsets. Encoding the two parts
separately and concatenating would differ from the joint encoding wherever the tokenizer marks
the start of a text (SentencePiece's "▁" in front of every response: 100% of Dolly rows with
TinyLlama's tokenizer) or merges across the boundary. Layout of one sequence::

    [bos?] prompt tokens | response tokens [eos]
    response_mask:   0 ...0 | 1 ...           1

so that ``encode(prompt + response) == input_ids[len(bos):len(input_ids) - 1]`` (without
truncation). ``bos`` is prepended exactly when the tokenizer itself adds one to a plain encode
(Llama-style tokenizers do, GPT-2's and Qwen's do not); ``eos`` is appended.

The boundary. A token that straddles it (starts in the prompt, ends in the response: a merge
such as "\\nThe") belongs to the response; the prompt part is then the tokens that end at or
before the boundary, and ``TokenizedExample.straddles`` is True. The prompt a generation engine
is given is :func:`prompt_token_ids` of the prompt text, which equals the prompt part of the
joint encoding whenever no token straddles (6000 of 6000 Dolly examples with the paper's GPT-2,
Qwen1.5 and TinyLlama tokenizers, measured; tokenizers trained by
:func:`cot2align_core.modeling.train_tokenizer` end a pre-token at the end of every prompt
template, so they never straddle). With a straddling tokenizer the model is trained to write
the merged token itself, while an engine is given the prompt's own last token: such examples
are counted by the tokenize stage rather than silently mixed in.

Offsets are character offsets into ``text = prompt + response`` (bos and eos get an empty span
at their position). Prompts are fitted before they get here (:mod:`cot2align_core.fitting` cuts
the row's input); a prompt longer than ``max_prompt_length`` is an error, never cut from the left.
"""
from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase


class TokenizerError(ValueError):
    """A tokenizer that cannot be used as it is; the message says what to set."""


@dataclass(frozen=True)
class TokenizedExample:
    """One tokenized example (module docstring for the layout). ``truncated``: the response
    was cut on the right to fit ``max_length`` (it then carries no eos). ``prompt_chars``:
    ``len(prompt)``, the boundary in ``text``."""

    id: str
    form: str
    text: str
    input_ids: list[int]
    response_mask: list[int]
    offsets_start: list[int]
    offsets_end: list[int]
    prompt_tokens: int
    truncated: bool
    prompt_chars: int = 0

    @property
    def response_tokens(self) -> int:
        return sum(self.response_mask)

    @property
    def straddles(self) -> bool:
        """Whether the first response token starts inside the prompt text (a merge across
        the boundary, which then belongs to the response)."""
        k = self.prompt_tokens
        return k < len(self.input_ids) and self.offsets_start[k] < self.prompt_chars


def check_tokenizer(tok: PreTrainedTokenizerBase, name: str) -> None:
    """Fail early, with the fix, on tokenizers the pipeline cannot batch or terminate."""
    if tok.eos_token_id is None:
        raise TokenizerError(
            f"{name} tokenizer has no eos token: responses could not be terminated. Set one "
            "(tokenizer.eos_token = ...) and save it again, or pick another tokenizer."
        )
    if not getattr(tok, "is_fast", False):
        raise TokenizerError(
            f"{name} tokenizer is a slow (Python) tokenizer without character offsets; "
            "use the fast version (a tokenizer.json)"
        )


def pad_token_id(tok: PreTrainedTokenizerBase) -> int:
    """The id used for padding: the pad token, else eos (padding is masked out everywhere)."""
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def _adds_bos(tok: PreTrainedTokenizerBase) -> bool:
    if tok.bos_token_id is None:
        return False
    ids = tok("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tok.bos_token_id


def _encode(tok: PreTrainedTokenizerBase, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def prompt_token_ids(tok: PreTrainedTokenizerBase, prompt: str, *, add_bos: bool = True) -> list[int]:
    """The token ids a generation engine is given for ``prompt``: the tokenizer's bos when it
    adds one (and ``add_bos``), then ``prompt`` encoded without special tokens. Equal to the
    prompt part of :func:`tokenize_pair`'s sequence unless a token straddles the boundary."""
    bos = [tok.bos_token_id] if add_bos and _adds_bos(tok) else []
    return bos + list(tok(prompt, add_special_tokens=False)["input_ids"])


def _split_at(offsets: list[tuple[int, int]], boundary: int) -> int:
    """Number of leading tokens that end at or before character ``boundary``."""
    k = 0
    while k < len(offsets) and offsets[k][1] <= boundary:
        k += 1
    return k


def tokenize_pair(tok: PreTrainedTokenizerBase, example_id: str, form: str, prompt: str,
                  response: str, *, max_length: int,
                  max_prompt_length: int | None = None) -> TokenizedExample:
    """Tokenise ``prompt + response`` jointly (+ bos, + eos), with the response mask and
    character offsets (module docstring).

    A response that does not fit ``max_length`` is cut on the right (and then carries no eos;
    ``truncated`` is set). A prompt longer than ``max_prompt_length`` tokens (bos included)
    raises :class:`TokenizerError`: fit the row first (:func:`cot2align_core.fitting.fit_example`).
    """
    where = f"example {example_id} ({form})"
    if tok.eos_token_id is None:
        raise TokenizerError(f"{where}: the tokenizer has no eos token to end the response "
                             "with; set tokenizer.eos_token (see check_tokenizer)")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise TokenizerError(f"{where}: max_prompt_length must be at least 1, got "
                             f"{max_prompt_length} (tokenize.max_prompt_length)")
    ids, offs = _encode(tok, prompt + response)
    k = _split_at(offs, len(prompt))
    bos = [tok.bos_token_id] if _adds_bos(tok) else []
    n_prompt = len(bos) + k
    if max_prompt_length is not None and n_prompt > max_prompt_length:
        raise TokenizerError(
            f"{where}: the prompt has {n_prompt} tokens, more than max_prompt_length="
            f"{max_prompt_length}; fit the row first (cot2align_core.fitting.fit_example cuts "
            "its input), or raise tokenize.max_prompt_length")
    room = max_length - n_prompt
    if room < 1:
        raise TokenizerError(
            f"{where}: max_length {max_length} leaves no room for a response after a "
            f"{n_prompt}-token prompt; raise tokenize.max_length (teacher_sft.training.max_length "
            "for the teacher's SFT) or lower tokenize.max_prompt_length below it")
    end = len(prompt) + len(response)
    r_ids, r_offs = ids[k:] + [tok.eos_token_id], offs[k:] + [(end, end)]
    truncated = len(r_ids) > room
    r_ids, r_offs = r_ids[:room], r_offs[:room]
    offs = [(offs[0][0] if offs else 0,) * 2] * len(bos) + offs[:k] + r_offs
    return TokenizedExample(
        id=example_id, form=form, text=prompt + response, input_ids=bos + ids[:k] + r_ids,
        response_mask=[0] * n_prompt + [1] * len(r_ids),
        offsets_start=[a for a, _ in offs], offsets_end=[b for _, b in offs],
        prompt_tokens=n_prompt, truncated=truncated, prompt_chars=len(prompt),
    )


def response_ids(ex: TokenizedExample) -> list[int]:
    """The response token ids (what MinED aligns), eos included: one per prediction position."""
    return ex.input_ids[ex.prompt_tokens:]
