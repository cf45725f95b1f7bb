"""Dual tokenisation: one example, two forms (standard, CoT), two tokenizers (teacher, student).

The prompt and the response are tokenised separately and concatenated, so the prompt/response
boundary falls on a token boundary for every tokenizer (a merge across it would make the
response mask ambiguous), and the prompt tokens equal what a generation engine sees when it is
given the prompt alone. Layout of one sequence::

    [bos?] prompt tokens | response tokens [eos]
    response_mask:   0 ...0 | 1 ...           1

``bos`` is prepended exactly when the tokenizer itself adds one to a plain encode (Llama-style
tokenizers do, GPT-2's does not). ``max_prompt_length`` counts every prompt token, ``bos``
included, as the generation engine's ``max_prompt_tokens`` does: a long prompt keeps ``bos`` and
its last tokens. Offsets are character offsets into ``text = prompt + response`` (special tokens
get an empty span at their position).
"""
from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase


class TokenizerError(ValueError):
    """A tokenizer that cannot be used as it is; the message says what to set."""


@dataclass(frozen=True)
class TokenizedExample:
    id: str
    form: str
    text: str
    input_ids: list[int]
    response_mask: list[int]
    offsets_start: list[int]
    offsets_end: list[int]
    prompt_tokens: int
    truncated: bool

    @property
    def response_tokens(self) -> int:
        return sum(self.response_mask)


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


def tokenize_pair(tok: PreTrainedTokenizerBase, example_id: str, form: str, prompt: str,
                  response: str, *, max_length: int, max_prompt_length: int) -> TokenizedExample:
    """Tokenise ``prompt + response`` (+ eos) with the response mask and character offsets.

    Too-long prompts lose tokens from the left (the instruction's end and the response header
    stay); too-long responses are cut on the right (and then carry no eos).
    """
    if tok.eos_token_id is None:
        raise TokenizerError(
            f"example {example_id} ({form}): the tokenizer has no eos token to end the "
            "response with; set tokenizer.eos_token (see check_tokenizer)"
        )
    if max_prompt_length < 1:
        raise TokenizerError(
            f"example {example_id} ({form}): max_prompt_length must be at least 1, got "
            f"{max_prompt_length} (tokenize.max_prompt_length)"
        )
    p_ids, p_off = _encode(tok, prompt)
    r_ids, r_off = _encode(tok, response)
    shift = len(prompt)
    r_off = [(a + shift, b + shift) for a, b in r_off]
    truncated = False
    bos = [tok.bos_token_id] if _adds_bos(tok) else []
    if len(bos) + len(p_ids) > max_prompt_length:
        if max_prompt_length < 2:
            bos = []  # no room for bos and a prompt token: keep the last token (as generation does)
        keep = max_prompt_length - len(bos)
        p_ids, p_off = p_ids[len(p_ids) - keep:], p_off[len(p_off) - keep:]
        truncated = True
    bos_off = [(p_off[0][0] if p_off else 0,) * 2] if bos else []
    r_ids = r_ids + [tok.eos_token_id]
    r_off = r_off + [(len(prompt) + len(response),) * 2]
    room = max_length - len(bos) - len(p_ids)
    if room < 1:
        raise TokenizerError(
            f"example {example_id} ({form}): max_length {max_length} leaves no room for a "
            f"response after a {len(bos) + len(p_ids)}-token prompt; raise tokenize.max_length "
            "(teacher_sft.training.max_length for the teacher's SFT) or lower "
            "tokenize.max_prompt_length below it"
        )
    if len(r_ids) > room:
        r_ids, r_off = r_ids[:room], r_off[:room]
        truncated = True
    ids = bos + p_ids + r_ids
    offs = bos_off + p_off + r_off
    n_prompt = len(bos) + len(p_ids)
    return TokenizedExample(
        id=example_id, form=form, text=prompt + response, input_ids=ids,
        response_mask=[0] * n_prompt + [1] * len(r_ids),
        offsets_start=[a for a, _ in offs], offsets_end=[b for _, b in offs],
        prompt_tokens=n_prompt, truncated=truncated,
    )


def response_ids(ex: TokenizedExample) -> list[int]:
    """The response token ids (what MinED aligns), eos included: one per prediction position."""
    return ex.input_ids[ex.prompt_tokens:]
