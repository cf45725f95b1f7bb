r"""MinED: cross-tokenizer KD by minimum edit distance (Wan et al. 2024, FuseLLM).

Two tokenizers cut one text differently, and their vocabularies differ. MinED bridges both gaps
with edit distances between token *strings*:

1. **Token alignment** (per example, :func:`min_edit_alignment`): dynamic time warping between
   the teacher's and the student's response tokens, with the local cost between two tokens
   their edit (Levenshtein) distance. Each student position aligned to exactly one teacher
   position gets that teacher distribution (:func:`alignment_tensor`).
2. **Vocabulary mapping** (once per tokenizer pair, :func:`build_vocab_mapping`): every
   teacher token id is mapped to the student id with the same string when there is one, else
   to the student token at minimum edit distance.
3. **Loss** (:func:`mined_kd_loss`): the teacher's (top-k) distribution at the aligned position
   is carried into the student vocabulary through the mapping (probabilities of teacher tokens
   mapped to one student token add up) and the student is trained with
   :math:`\mathrm{KL}(p_{t \to s} \| q_s)` on the aligned positions.

Token strings are compared *normalised* (:class:`TokenNormalizer`): each token becomes the
bytes it stands for (byte-level BPE characters such as ``Ġ``/``Ċ`` decoded through GPT-2's
byte table, SentencePiece's ``▁`` as a space, byte-fallback ``<0x0A>`` as that byte), written
as a latin-1 string so that ASCII reads as itself (``'Ġthe'`` and ``'▁the'`` both become
``' the'``) and an edit distance counts bytes. Byte-level tokenizers that split a multi-byte
character thus compare sensibly with ones that do not.

References
----------
.. [1] F. Wan et al. Knowledge Fusion of Large Language Models. ICLR 2024 (FuseLLM: MinED
   token alignment by DTW on edit distances; vocabulary mapping by exact match, then minimum
   edit distance).
.. [2] S. Zhang et al. Dual-Space Knowledge Distillation for Large Language Models. EMNLP 2024
   (MinED as a cross-tokenizer KD baseline).
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "TokenNormalizer",
    "edit_distance",
    "edit_distance_matrix",
    "min_edit_alignment",
    "alignment_tensor",
    "map_tokens_by_min_edit",
    "build_vocab_mapping",
    "mined_kd_loss",
]


# --------------------------------------------------------------------------------------------
# Token normalisation
# --------------------------------------------------------------------------------------------


def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable character -> the byte it stands for."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_LEVEL = _byte_level_table()
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _as_latin1(text: str) -> str:
    """The UTF-8 bytes of ``text`` as a latin-1 string (one character per byte)."""
    return text.encode("utf-8").decode("latin-1")


class TokenNormalizer:
    """Maps a tokenizer's token strings to the bytes they stand for (as latin-1 strings).

    The steps are read from the fast tokenizer's decoder (``Replace`` patterns, ``Metaspace``,
    ``ByteFallback``, ``ByteLevel``, in their order), applied to one token at a time; steps that
    only make sense on a whole sequence (``Strip``, ``Fuse``) are skipped. Without a backend
    decoder the scheme is guessed from the vocabulary (``Ġ`` vs ``▁`` prefixed tokens).
    Added/special tokens (``<|endoftext|>``, ``</s>``) are kept literally.

    >>> norm = TokenNormalizer.from_tokenizer(gpt2_tokenizer)   # doctest: +SKIP
    >>> norm("Ġthe"), norm("Ċ")                                 # doctest: +SKIP
    (' the', '\\n')
    """

    def __init__(self, steps: Sequence[tuple[str, object]], literal: Sequence[str] = ()):
        self.steps = list(steps)
        self.literal = set(literal)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_tokenizer(cls, tokenizer) -> "TokenNormalizer":
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        literal = [getattr(t, "content", str(t)) for t in added.values()]
        steps = None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = getattr(backend, "decoder", None) if backend is not None else None
        if decoder is not None:
            try:
                spec = json.loads(decoder.__getstate__())
                steps = cls._steps_from_decoder(spec)
            except (AttributeError, TypeError, ValueError):
                steps = None
        if steps is None:
            steps = cls._guess_steps(tokenizer)
        return cls(steps, literal)

    @staticmethod
    def _steps_from_decoder(spec: dict) -> list[tuple[str, object]]:
        steps: list[tuple[str, object]] = []
        for d in spec.get("decoders", [spec]) if spec.get("type") == "Sequence" else [spec]:
            kind = d.get("type")
            if kind == "Replace":
                pat = d.get("pattern", {})
                if "String" in pat:
                    steps.append(("replace", (re.escape(pat["String"]), d.get("content", ""))))
                elif "Regex" in pat:
                    steps.append(("replace", (pat["Regex"], d.get("content", ""))))
            elif kind == "Metaspace":
                steps.append(("replace", (re.escape(d.get("replacement", "\u2581")), " ")))
            elif kind == "ByteFallback":
                steps.append(("byte_fallback", None))
            elif kind == "ByteLevel":
                steps.append(("byte_level", None))
            elif kind == "WordPiece":
                prefix = d.get("prefix", "##")
                steps.append(("replace", ("^" + re.escape(prefix), "")))
        return steps

    @staticmethod
    def _guess_steps(tokenizer) -> list[tuple[str, object]]:
        vocab = tokenizer.get_vocab()
        g = sum(1 for t in vocab if "\u0120" in t or "\u010a" in t)
        s = sum(1 for t in vocab if "\u2581" in t)
        if g > s:
            return [("byte_level", None)]
        if s > 0:
            return [("replace", (re.escape("\u2581"), " ")), ("byte_fallback", None)]
        return []

    # ---------------------------------------------------------------- use
    def __call__(self, token: str | None) -> str | None:
        if token is None:
            return None
        if token in self.literal:
            return _as_latin1(token)
        text, is_bytes = token, False
        for kind, arg in self.steps:
            if is_bytes:
                break
            if kind == "replace":
                pattern, content = arg
                text = re.sub(pattern, content, text)
            elif kind == "byte_fallback":
                m = _BYTE_FALLBACK.match(text)
                if m:
                    text, is_bytes = chr(int(m.group(1), 16)), True
            elif kind == "byte_level":
                if all(c in _BYTE_LEVEL for c in text):
                    text, is_bytes = "".join(chr(_BYTE_LEVEL[c]) for c in text), True
        return text if is_bytes else _as_latin1(text)

    def vocab(self, tokenizer, size: int | None = None) -> list[str | None]:
        """Normalised strings of ids ``0 .. size-1`` (default ``len(tokenizer)``); None for ids
        without a token."""
        size = len(tokenizer) if size is None else size
        raw = tokenizer.convert_ids_to_tokens(list(range(size)))
        return [self(t) for t in raw]

    def tokens(self, tokenizer, ids: Sequence[int]) -> list[str]:
        """Normalised strings of the given ids (what :func:`min_edit_alignment` compares)."""
        return [self(t) or "" for t in tokenizer.convert_ids_to_tokens(list(ids))]


# --------------------------------------------------------------------------------------------
# Edit distances, vectorised
# --------------------------------------------------------------------------------------------


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (unit insert/delete/substitute), plain dynamic programming."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _codes(strings: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings -> (code points [n, L] int32, padded with -1; lengths [n])."""
    lengths = np.fromiter((len(s) for s in strings), dtype=np.int64, count=len(strings))
    L = int(lengths.max()) if len(strings) else 0
    out = np.full((len(strings), max(L, 1)), -1, dtype=np.int32)
    for i, s in enumerate(strings):
        if s:
            out[i, : len(s)] = np.frombuffer(s.encode("utf-32-le"), dtype=np.int32)
    return out, lengths


_BLOCK = 1 << 21  # elements of one DP row block (na * nb * (Ls + 1))


def _ed_block(A: np.ndarray, la: np.ndarray, S: np.ndarray, ls: np.ndarray) -> np.ndarray:
    """Edit distances between all rows of ``A`` and all rows of ``S`` -> ``[na, nb]`` int64.

    One Levenshtein row per character of ``A``, for all pairs at once, on the shifted table
    ``E[i, j] = D[i, j] - j``, whose recurrence is

        E[i, j] = min(E[i-1, j] + 1,  E[i-1, j-1] - [a_i = b_j],  E[i, j-1]),   E[0, j] = 0,

    so that the left-to-right dependency within a row is a running minimum
    (``np.minimum.accumulate``). The DP axis ``j`` comes first in memory (``[Ls + 1, na, nb]``)
    so that the accumulation runs over large contiguous slices.
    """
    na, nb = A.shape[0], S.shape[0]
    Ls = S.shape[1]
    out = np.empty((na, nb), dtype=np.int64)
    if na == 0 or nb == 0:
        return out
    ST = np.ascontiguousarray(S.T)[:, None, :]  # [Ls, 1, nb]
    cols = np.arange(nb)
    # E lies in [-Ls, La]: one byte per cell is enough for strings under 127 characters.
    dt = np.int8 if max(Ls, int(la.max())) < 127 else np.int32
    prev = np.zeros((Ls + 1, na, nb), dtype=dt)
    cur = np.empty_like(prev)
    tmp = np.empty((Ls, na, nb), dtype=dt)
    rows0 = la == 0
    if rows0.any():
        out[rows0] = ls[None, :]
    for i in range(1, int(la.max()) + 1):
        eq = ST == A[None, :, i - 1, None]  # [Ls, na, nb]
        cur[0] = i
        np.subtract(prev[:-1], eq, out=cur[1:], casting="unsafe")
        np.add(prev[1:], 1, out=tmp)
        np.minimum(cur[1:], tmp, out=cur[1:])
        np.minimum.accumulate(cur, axis=0, out=cur)
        sel = np.nonzero(la == i)[0]
        if sel.size:
            out[sel] = cur[ls[None, :], sel[:, None], cols[None, :]] + ls[None, :]
        prev, cur = cur, prev
    return out


def edit_distance_matrix(a: Sequence[str], b: Sequence[str]) -> np.ndarray:
    """``D[i, j] = edit_distance(a[i], b[j])`` for all pairs, ``[len(a), len(b)]`` int64.

    Duplicate strings are computed once; the pairs are processed in vectorised blocks.
    """
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), dtype=np.int64)
    ua, ia = np.unique(np.asarray(list(a), dtype=object), return_inverse=True)
    ub, ib = np.unique(np.asarray(list(b), dtype=object), return_inverse=True)
    A, la = _codes(list(ua))
    S, ls = _codes(list(ub))
    D = np.empty((len(ua), len(ub)), dtype=np.int64)
    step = max(1, _BLOCK // max(1, len(ub) * (S.shape[1] + 1)))
    order = np.argsort(la, kind="stable")  # similar lengths together: fewer wasted rows
    for s in range(0, len(ua), step):
        rows = order[s: s + step]
        Lr = max(int(la[rows].max()), 1)
        D[rows] = _ed_block(A[rows, :Lr], la[rows], S, ls)
    return D[np.asarray(ia)][:, np.asarray(ib)]


# --------------------------------------------------------------------------------------------
# Token alignment
# --------------------------------------------------------------------------------------------


def min_edit_alignment(teacher_tokens: Sequence[str],
                       student_tokens: Sequence[str]) -> list[tuple[int, int]]:
    r"""Align two token sequences of one text by DTW on edit distances (FuseLLM's MinED).

    With :math:`c_{ij}` the edit distance between teacher token ``i`` and student token ``j``
    (give normalised strings, :meth:`TokenNormalizer.tokens`), the cumulative cost is

    .. math::
        M_{ij} = c_{ij} + \min(M_{i-1, j-1},\ M_{i-1, j},\ M_{i, j-1}), \qquad M_{00} = c_{00},

    and the alignment is the optimal warping path traced back from :math:`(n-1, m-1)` to
    :math:`(0, 0)`, preferring the diagonal, then the teacher step, then the student step on
    ties (as FuseLLM's ``dtw``). Every token of both sides appears in at least one pair; a
    token matched to several tokens of the other side is a one-to-many alignment.

    Each row of ``M`` is computed in one vectorised pass: with
    :math:`t_j = c_{ij} + \min(M_{i-1,j-1}, M_{i-1,j})` and :math:`S_j = \sum_{l \le j} c_{il}`,
    :math:`M_{ij} = S_j + \min_{k \le j} (t_k - S_k)`. Cost O(n m), a few ms for n, m ~ 512.

    Returns
    -------
    list of (teacher_index, student_index), in increasing order along the path; ``[]`` when
    either side is empty.
    """
    n, m = len(teacher_tokens), len(student_tokens)
    if n == 0 or m == 0:
        return []
    C = edit_distance_matrix(teacher_tokens, student_tokens).astype(np.float64)
    M = np.empty((n, m), dtype=np.float64)
    prev = np.full(m + 1, np.inf)
    prev[0] = 0.0
    for i in range(n):
        c = C[i]
        t = c + np.minimum(prev[:-1], prev[1:])
        S = np.cumsum(c)
        row = np.minimum.accumulate(t - S) + S
        M[i] = row
        prev = np.concatenate(([np.inf], row))
    i, j = n - 1, m - 1
    path = []
    inf = float("inf")
    while i > 0 or j > 0:
        path.append((i, j))
        diag = M[i - 1, j - 1] if i > 0 and j > 0 else inf
        up = M[i - 1, j] if i > 0 else inf
        left = M[i, j - 1] if j > 0 else inf
        if diag <= up and diag <= left:
            i, j = i - 1, j - 1
        elif up <= left:
            i -= 1
        else:
            j -= 1
    path.append((0, 0))
    path.reverse()
    return path


def alignment_tensor(pairs: Sequence[tuple[int, int]], R_s: int, *,
                     one_to_many: str = "skip") -> Tensor:
    """Student position -> aligned teacher position, from :func:`min_edit_alignment` pairs.

    Parameters
    ----------
    pairs : sequence of (teacher_index, student_index)
    R_s : int
        Length of the result (student positions; pairs beyond it are ignored).
    one_to_many : {"skip", "first", "last"}
        A student token aligned to several teacher tokens (it spans them) has no single teacher
        distribution for it: ``"skip"`` (default, FuseLLM's choice) gives -1, ``"first"`` /
        ``"last"`` take the first / last of them. Several student tokens aligned to one teacher
        token all get it (many-to-one).

    Returns
    -------
    LongTensor, shape (R_s,): teacher position or -1.
    """
    if one_to_many not in ("skip", "first", "last"):
        raise ValueError(f"one_to_many must be 'skip', 'first' or 'last', got {one_to_many!r}")
    out = [-1] * R_s
    seen = [0] * R_s
    for ti, sj in pairs:
        if not 0 <= sj < R_s:
            continue
        seen[sj] += 1
        if seen[sj] == 1 or one_to_many == "last":
            out[sj] = int(ti)
    if one_to_many == "skip":
        out = [o if c == 1 else -1 for o, c in zip(out, seen)]
    return torch.tensor(out, dtype=torch.long)


# --------------------------------------------------------------------------------------------
# Vocabulary mapping
# --------------------------------------------------------------------------------------------


def _bucket_key(s: str) -> str:
    """Candidates share this key: the first character, or the first two after a leading space."""
    return s[:2] if s[:1] == " " else s[:1]


def map_tokens_by_min_edit(teacher: Sequence[str | None], student: Sequence[str | None], *,
                           window: int = 2, fallback_id: int = 0) -> np.ndarray:
    r"""Map each teacher string to a student index: exact match, else minimum edit distance.

    For teacher string ``t``:

    1. the lowest student index with the same string, if any;
    2. else, among the student strings with the same *bucket key* (first character, or first
       two when the first is a space: ``' the'`` looks among the ``' t…'`` tokens), the one at
       minimum edit distance, ties broken by the smaller length difference, then the lower
       index. This is the exact minimum over the bucket: candidates whose length is within
       ``window`` of ``len(t)`` are scored first, and the others (whose distance is at least
       their length difference > ``window``) only when the best so far exceeds ``window + 1``;
    3. else (empty bucket) the longest student string that is a prefix of ``t``;
    4. else ``fallback_id`` (also for a None / empty teacher string).

    Restricting step 2 to the bucket (rather than the whole student vocabulary, as FuseLLM
    does) keeps a 151k x 50k mapping to seconds and keeps the word-start and first character,
    which the global minimum may change.

    Returns
    -------
    np.ndarray of int64, shape (len(teacher),), values in ``[0, len(student))``
    """
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window!r}")
    if not len(student):
        raise ValueError("the student vocabulary is empty")
    if not 0 <= fallback_id < len(student):
        raise ValueError(f"fallback_id {fallback_id} is outside [0, {len(student)})")
    exact: dict[str, int] = {}
    for j, s in enumerate(student):
        if s and s not in exact:
            exact[s] = j
    out = np.full(len(teacher), fallback_id, dtype=np.int64)
    todo: dict[str, list[int]] = defaultdict(list)
    for i, t in enumerate(teacher):
        if not t:
            continue
        j = exact.get(t)
        if j is not None:
            out[i] = j
        else:
            todo[_bucket_key(t)].append(i)

    buckets: dict[str, list[int]] = defaultdict(list)
    for s, j in exact.items():  # unique strings, lowest index each
        buckets[_bucket_key(s)].append(j)

    for key, t_ids in todo.items():
        cand = np.asarray(sorted(buckets.get(key, [])), dtype=np.int64)
        if cand.size == 0:
            for i in t_ids:
                t = teacher[i]
                out[i] = next((exact[t[:L]] for L in range(len(t) - 1, 0, -1) if t[:L] in exact),
                              fallback_id)
            continue
        c_str = [student[j] for j in cand]
        C, lc = _codes(c_str)
        t_str = [teacher[i] for i in t_ids]
        T, lt = _codes(t_str)
        t_ids_arr = np.asarray(t_ids, dtype=np.int64)
        for L in np.unique(lt):
            rows = np.nonzero(lt == L)[0]
            near = np.abs(lc - L) <= window
            best = _best_candidates(T[rows, :L], lt[rows], C, lc, cand, near)
            if (~near).any():
                redo = np.nonzero((best[:, 0] > window + 1))[0]
                if redo.size:
                    far = _best_candidates(T[rows[redo], :L], lt[rows[redo]], C, lc, cand, ~near)
                    better = _score(far) < _score(best[redo])
                    best[redo[better]] = far[better]
            out[t_ids_arr[rows]] = best[:, 2]
    return out


def _score(best: np.ndarray) -> np.ndarray:
    """Lexicographic (distance, length difference, index) as one int64."""
    return (best[:, 0] << 42) + (best[:, 1] << 32) + best[:, 2]


def _best_candidates(T, lt, C, lc, cand, use) -> np.ndarray:
    """For each row of ``T``: (distance, |length diff|, student index) of its best candidate
    among ``cand[use]``; distance = large when there is none."""
    n = T.shape[0]
    best = np.empty((n, 3), dtype=np.int64)
    best[:, 0], best[:, 1], best[:, 2] = 1 << 20, 0, 0
    idx = np.nonzero(use)[0]
    if idx.size == 0 or n == 0:
        return best
    Cs, ls, cs = C[idx], lc[idx], cand[idx]
    Ls = max(int(ls.max()), 1)
    Cs = Cs[:, :Ls]
    step = max(1, _BLOCK // (idx.size * (Ls + 1)))
    for s in range(0, n, step):
        r = slice(s, s + step)
        D = _ed_block(T[r], lt[r], Cs, ls)  # [nr, nc]
        dl = np.abs(ls[None, :] - lt[r, None])
        score = (D << 42) + (dl << 32) + cs[None, :]
        k = score.argmin(1)
        best[r, 0] = D[np.arange(D.shape[0]), k]
        best[r, 1] = dl[np.arange(D.shape[0]), k]
        best[r, 2] = cs[k]
    return best


def build_vocab_mapping(teacher_tokenizer, student_tokenizer, *,
                        teacher_vocab_size: int | None = None, window: int = 2) -> np.ndarray:
    """Teacher id -> student id, for carrying teacher distributions into the student vocabulary.

    Token strings of both tokenizers are normalised (:class:`TokenNormalizer`), then mapped by
    :func:`map_tokens_by_min_edit` (exact string match first, then minimum edit distance within
    the bucket of the same first character). Among student tokens with one normalised string
    (SentencePiece's ``▁`` and its byte-fallback ``<0x20>``), the regular token is the target.
    The teacher's eos / bos / unk / pad map to the student's when both have them. Teacher ids
    without a token (an embedding matrix padded beyond ``len(tokenizer)``) map to the
    student's unk, else eos.

    Parameters
    ----------
    teacher_tokenizer, student_tokenizer : transformers tokenizers
    teacher_vocab_size : int, optional
        Length of the result (the teacher model's vocabulary, i.e. its logits' width); default
        ``len(teacher_tokenizer)``.
    window : int
        See :func:`map_tokens_by_min_edit`.

    Returns
    -------
    np.ndarray of int64, shape (teacher_vocab_size,), values in ``[0, len(student_tokenizer))``.
    Cache it (``np.save``): Qwen1.5 (151k) -> GPT-2 (50k) takes some seconds.
    """
    t_norm = TokenNormalizer.from_tokenizer(teacher_tokenizer)
    s_norm = TokenNormalizer.from_tokenizer(student_tokenizer)
    V_t = len(teacher_tokenizer) if teacher_vocab_size is None else int(teacher_vocab_size)
    t_strings = t_norm.vocab(teacher_tokenizer, min(V_t, len(teacher_tokenizer)))
    t_strings += [None] * (V_t - len(t_strings))
    s_raw = student_tokenizer.convert_ids_to_tokens(list(range(len(student_tokenizer))))
    s_strings = [s_norm(t) for t in s_raw]
    # One student id per string: regular tokens over byte-fallback ones.
    owner = _string_owners(s_raw, s_strings)
    s_strings = [s if not s or owner[s] == j else None for j, s in enumerate(s_strings)]
    fallback = next((i for i in (student_tokenizer.unk_token_id, student_tokenizer.eos_token_id, 0)
                     if i is not None), 0)
    mapping = map_tokens_by_min_edit(t_strings, s_strings, window=window, fallback_id=fallback)
    for name in ("eos_token_id", "bos_token_id", "unk_token_id", "pad_token_id"):
        ti, si = getattr(teacher_tokenizer, name, None), getattr(student_tokenizer, name, None)
        if ti is not None and si is not None and 0 <= ti < V_t:
            mapping[ti] = si
    return mapping


def _string_owners(raw: Sequence[str | None], strings: Sequence[str | None]) -> dict[str, int]:
    """Normalised string -> the one id that stands for it: the lowest, except that a regular
    token wins over a byte-fallback one (SentencePiece's ``▁`` and ``<0x20>``). Empty and
    None strings have no owner."""
    owner: dict[str, int] = {}
    for j, (r, s) in enumerate(zip(raw, strings)):
        if not s:
            continue
        k = owner.get(s)
        if k is None or (_BYTE_FALLBACK.match(raw[k] or "") and not _BYTE_FALLBACK.match(r or "")):
            owner[s] = j
    return owner


def same_spelling_pairs(teacher_tokenizer, student_tokenizer, *,
                        teacher_vocab_size: int | None = None,
                        student_vocab_size: int | None = None) -> tuple[list[int], list[int]]:
    """The tokens spelled the same in both vocabularies: ``(student ids, teacher ids)``.

    Strings are compared after :class:`TokenNormalizer` (so GPT-2's ``Ġthe`` and
    SentencePiece's ``▁the`` are both `` the``); a string with several ids on a side takes its
    regular token over a byte-fallback one, else the lowest id. Added and special tokens are
    left out, except that the two end-of-sequence tokens are paired with each other. Ids at or
    beyond a ``*_vocab_size`` (an embedding matrix smaller than the tokenizer) are left out.
    Sorted by student id.
    """
    def strings(tok, size):
        norm = TokenNormalizer.from_tokenizer(tok)
        size = len(tok) if size is None else min(int(size), len(tok))
        raw = tok.convert_ids_to_tokens(list(range(size)))
        special = set(getattr(tok, "all_special_ids", []) or [])
        texts = [None if r is None or r in norm.literal or i in special else norm(r)
                 for i, r in enumerate(raw)]
        return _string_owners(raw, texts), size

    t_ids, V_t = strings(teacher_tokenizer, teacher_vocab_size)
    s_ids, V_s = strings(student_tokenizer, student_vocab_size)
    pairs = {s_ids[text]: t_ids[text] for text in s_ids.keys() & t_ids.keys()}
    te, se = teacher_tokenizer.eos_token_id, student_tokenizer.eos_token_id
    if te is not None and se is not None and te < V_t and se < V_s:
        pairs[se] = te
    order = sorted(pairs)
    return order, [pairs[j] for j in order]


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


def mined_kd_loss(student_logits: Tensor, student_mask: Tensor, teacher_topk_ids: Tensor | None,
                  teacher_topk_logits: Tensor, teacher_mask: Tensor, alignment: Tensor,
                  vocab_map: Tensor | np.ndarray, *, temperature: float = 2.0) -> Tensor:
    r"""MinED KD: KL(teacher mapped into the student vocabulary || student), aligned positions.

    For student position ``r`` of example ``b`` with ``a = alignment[b, r] >= 0`` (a valid
    teacher position), the teacher distribution over its top-k entries at temperature ``T``,
    :math:`p_i = \mathrm{softmax}(z_{t}[b, a] / T)_i`, is carried into the student vocabulary,
    :math:`\tilde p_v = \sum_{i:\ \mathrm{map}(\mathrm{id}_i) = v} p_i`, and

    .. math::
        \mathcal{L} = \frac{1}{N} \sum_{(b, r)} \sum_v \tilde p_v
            \left(\log \tilde p_v - \log \mathrm{softmax}(z_s[b, r] / T)_v\right)

    over the N aligned positions of the batch (a token mean). No :math:`T^2` factor. With a
    top-k cache the teacher is renormalised over its top k (exact when k is its vocabulary).

    Parameters
    ----------
    student_logits : Tensor, shape (B, R_s, V_s)
    student_mask : Tensor, shape (B, R_s)
    teacher_topk_ids : LongTensor, shape (B, R_t, k), or None
        Teacher vocabulary ids of the given logits; None when ``teacher_topk_logits`` are the
        full teacher logits (``k = V_t``, entry ``i`` is id ``i``).
    teacher_topk_logits : Tensor, shape (B, R_t, k)
    teacher_mask : Tensor, shape (B, R_t)
    alignment : LongTensor, shape (B, R_s)
        Teacher position aligned to each student position, -1 for none (:func:`alignment_tensor`).
    vocab_map : LongTensor or np.ndarray, shape (V_t,)
        Teacher id -> student id (:func:`build_vocab_mapping`).
    temperature : float

    Returns
    -------
    Tensor, scalar; 0 when no position is aligned.
    """
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be [B, R_s, V_s], got {list(student_logits.shape)}")
    B, R_s, V_s = student_logits.shape
    if student_mask.shape != (B, R_s) or alignment.shape != (B, R_s):
        raise ValueError(
            f"student_mask {list(student_mask.shape)} and alignment {list(alignment.shape)} must "
            f"be [B, R_s] = {[B, R_s]}"
        )
    if teacher_topk_logits.dim() != 3 or (teacher_topk_ids is not None
                                          and teacher_topk_ids.shape != teacher_topk_logits.shape):
        raise ValueError(
            f"teacher_topk_ids {None if teacher_topk_ids is None else list(teacher_topk_ids.shape)}"
            f" and teacher_topk_logits {list(teacher_topk_logits.shape)} must both be [B, R_t, k]"
        )
    if teacher_topk_logits.shape[0] != B or teacher_mask.shape != teacher_topk_logits.shape[:2]:
        raise ValueError(
            f"teacher tensors must be [B={B}, R_t, k] with teacher_mask [B, R_t]; got logits "
            f"{list(teacher_topk_logits.shape)}, mask {list(teacher_mask.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    dev = student_logits.device
    vmap = torch.as_tensor(vocab_map, dtype=torch.long, device=dev)
    if vmap.dim() != 1:
        raise ValueError(f"vocab_map must be 1-D [V_t], got {list(vmap.shape)}")
    if vmap.numel() and (int(vmap.max()) >= V_s or int(vmap.min()) < 0):
        raise ValueError(f"vocab_map has student ids outside [0, {V_s})")
    R_t = teacher_topk_logits.shape[1]
    align = alignment.to(dev).long()
    ok = student_mask.to(dev).bool() & (align >= 0) & (align < R_t)
    t_mask = teacher_mask.to(dev).bool()
    rows = torch.arange(B, device=dev).unsqueeze(1).expand(B, R_s)
    a = align.clamp(0, max(R_t - 1, 0))
    if R_t > 0:
        ok = ok & t_mask[rows, a]
    if not bool(ok.any()):
        return student_logits.sum() * 0.0
    b_idx, r_idx, a_idx = rows[ok], torch.nonzero(ok)[:, 1], a[ok]
    if teacher_topk_ids is None:
        if teacher_topk_logits.shape[-1] != vmap.numel():
            raise ValueError(
                f"full teacher logits have {teacher_topk_logits.shape[-1]} entries but vocab_map "
                f"maps {vmap.numel()} teacher ids"
            )
        s_ids = vmap.unsqueeze(0).expand(b_idx.numel(), -1)
    else:
        t_ids = teacher_topk_ids.to(dev)[b_idx, a_idx].long()  # [N, k]
        if int(t_ids.max()) >= vmap.numel() or int(t_ids.min()) < 0:
            raise ValueError(f"teacher ids outside the vocab_map's range [0, {vmap.numel()})")
        s_ids = vmap[t_ids]
    wd = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    p = F.softmax(teacher_topk_logits.to(dev)[b_idx, a_idx].to(wd) / temperature, dim=-1)
    p_mapped = torch.zeros(p.shape[0], V_s, dtype=wd, device=dev).scatter_add_(1, s_ids, p)
    lq = F.log_softmax(student_logits[b_idx, r_idx].to(wd) / temperature, dim=-1)
    kl = (torch.xlogy(p_mapped, p_mapped) - p_mapped * lq).sum(-1)
    return kl.mean()
