"""MinED: edit distances, DTW token alignment, vocabulary mapping (real tokenizers), the loss."""
from __future__ import annotations

import itertools
import math
import random
import time

import numpy as np
import pytest
import torch

from cot2align_core.mined import (TokenNormalizer, alignment_tensor, build_vocab_mapping,
                                  edit_distance, edit_distance_matrix, map_tokens_by_min_edit,
                                  min_edit_alignment, mined_kd_loss, same_spelling_pairs)


def _rand_strings(rng, n, alphabet="ab c", lo=0, hi=6):
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


# ------------------------------------------------------------------------------- edit distance
def test_edit_distance_known_values():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3
    assert edit_distance("flaw", "lawn") == 2
    assert edit_distance("same", "same") == 0


def test_edit_distance_matrix_matches_plain_dp():
    rng = random.Random(0)
    a = _rand_strings(rng, 40, "abc é\n", 0, 9) + ["", "x" * 20, "\x00a", "xy" * 70]
    b = _rand_strings(rng, 35, "abc é\n", 0, 12) + ["", "\x00", "x" * 150]  # > 127: wider cells
    D = edit_distance_matrix(a, b)
    assert D.shape == (len(a), len(b))
    assert (D == np.array([[edit_distance(x, y) for y in b] for x in a])).all()
    assert edit_distance_matrix([], ["a"]).shape == (0, 1)


# ------------------------------------------------------------------------------- alignment
def _naive_dtw_path(t, s):
    """FuseLLM's dtw, written with plain loops."""
    n, m = len(t), len(s)
    M = [[math.inf] * (m + 1) for _ in range(n + 1)]
    M[0][0] = 0
    for i in range(n):
        for j in range(m):
            M[i + 1][j + 1] = edit_distance(t[i], s[j]) + min(M[i][j + 1], M[i + 1][j], M[i][j])
    M = [row[1:] for row in M[1:]]
    i, j, path = n - 1, m - 1, []
    while i > 0 or j > 0:
        path.append((i, j))
        opts = [M[i - 1][j - 1] if i > 0 and j > 0 else math.inf,
                M[i - 1][j] if i > 0 else math.inf,
                M[i][j - 1] if j > 0 else math.inf]
        move = opts.index(min(opts))
        i, j = (i - 1, j - 1) if move == 0 else (i - 1, j) if move == 1 else (i, j - 1)
    path.append((0, 0))
    return path[::-1], M[n - 1][m - 1]


def _all_paths(n, m):
    """Every monotone warping path from (0, 0) to (n-1, m-1) (brute force, small n, m)."""
    def rec(i, j):
        if (i, j) == (n - 1, m - 1):
            yield [(i, j)]
            return
        for di, dj in ((1, 1), (1, 0), (0, 1)):
            if i + di < n and j + dj < m:
                for rest in rec(i + di, j + dj):
                    yield [(i, j)] + rest
    yield from rec(0, 0)


def test_min_edit_alignment_known_example():
    teacher = [" The", " cat", "s", " sat", "."]
    student = [" The", " ca", "ts", " sat", "."]
    assert min_edit_alignment(teacher, student) == [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4)]
    # Edit distances favour short partners: "believ" and "able" are nearer to "!" (6, 4) than
    # to " unbelievable" (7, 9), so DTW gives them to "!" (total 10 + 6 + 4 + 0 = 20).
    teacher = [" un", "believ", "able", "!"]
    student = [" unbelievable", "!"]
    pairs = min_edit_alignment(teacher, student)
    assert pairs == [(0, 0), (1, 1), (2, 1), (3, 1)]
    assert alignment_tensor(pairs, 2).tolist() == [0, -1]  # "!" spans 3 teacher tokens: skipped
    assert min_edit_alignment([], ["a"]) == []


def test_min_edit_alignment_is_optimal_and_matches_naive_dtw():
    rng = random.Random(1)
    for _ in range(25):
        n, m = rng.randint(1, 4), rng.randint(1, 4)
        t, s = _rand_strings(rng, n, "ab ", 0, 3), _rand_strings(rng, m, "ab ", 0, 3)
        pairs = min_edit_alignment(t, s)
        want, best = _naive_dtw_path(t, s)
        assert pairs == want
        costs = [sum(edit_distance(t[i], s[j]) for i, j in p) for p in _all_paths(n, m)]
        assert sum(edit_distance(t[i], s[j]) for i, j in pairs) == min(costs) == best
    for _ in range(5):  # longer sequences against the naive DP only
        t, s = _rand_strings(rng, 30, "abc ", 0, 4), _rand_strings(rng, 23, "abc ", 0, 5)
        assert min_edit_alignment(t, s) == _naive_dtw_path(t, s)[0]


def test_alignment_tensor_modes():
    pairs = [(0, 0), (1, 0), (2, 1), (3, 2), (4, 2), (5, 3), (6, 3)]
    assert alignment_tensor(pairs, 5).tolist() == [-1, 2, -1, -1, -1]
    assert alignment_tensor(pairs, 5, one_to_many="first").tolist() == [0, 2, 3, 5, -1]
    assert alignment_tensor(pairs, 3, one_to_many="last").tolist() == [1, 2, 4]
    assert alignment_tensor([(0, 0), (0, 1), (1, 2)], 3).tolist() == [0, 0, 1]  # many-to-one
    assert alignment_tensor(pairs, 5).dtype == torch.long
    with pytest.raises(ValueError):
        alignment_tensor(pairs, 5, one_to_many="mean")


# ------------------------------------------------------------------------------- mapping
def _naive_map(teacher, student, fallback=0):
    out = []
    for t in teacher:
        if not t:
            out.append(fallback)
            continue
        same = [j for j, s in enumerate(student) if s == t]
        if same:
            out.append(same[0])
            continue
        key = t[:2] if t[0] == " " else t[:1]
        cands = [(edit_distance(t, s), abs(len(s) - len(t)), j) for j, s in enumerate(student)
                 if s and (s[:2] if s[0] == " " else s[:1]) == key]
        if cands:
            out.append(min(cands)[2])
            continue
        pref = [j for L in range(len(t) - 1, 0, -1) for j, s in enumerate(student) if s == t[:L]]
        out.append(pref[0] if pref else fallback)
    return out


@pytest.mark.parametrize("window", [0, 1, 2, 5])
def test_map_tokens_by_min_edit_matches_brute_force(window):
    rng = random.Random(10 + window)
    student = _rand_strings(rng, 150, "abc ", 1, 7) + [None, "", "zq"]
    student = list(dict.fromkeys(student))  # some duplicates removed, keeps None/""
    student += ["ab", "ab"]  # duplicate strings: the lowest index wins
    teacher = _rand_strings(rng, 300, "abcz ", 0, 9) + [None, "  x", "zqq", "qq"]
    got = map_tokens_by_min_edit(teacher, student, window=window, fallback_id=3)
    assert got.tolist() == _naive_map(teacher, student, fallback=3)


def test_map_tokens_errors():
    with pytest.raises(ValueError):
        map_tokens_by_min_edit(["a"], [], window=1)
    with pytest.raises(ValueError):
        map_tokens_by_min_edit(["a"], ["a"], window=-1)


@pytest.fixture(scope="module")
def tokenizers(shared_tokenizer_dir):
    from transformers import AutoTokenizer
    return {name: AutoTokenizer.from_pretrained(str(shared_tokenizer_dir(name)))
            for name in ("Qwen1.5-1.8B", "gpt2-base", "tinyllama-1.1b-3T")}


def test_token_normalizer_real_tokenizers(tokenizers):
    gpt2 = TokenNormalizer.from_tokenizer(tokenizers["gpt2-base"])
    llama = TokenNormalizer.from_tokenizer(tokenizers["tinyllama-1.1b-3T"])
    qwen = TokenNormalizer.from_tokenizer(tokenizers["Qwen1.5-1.8B"])
    assert gpt2("\u0120the") == " the" and gpt2("\u010a") == "\n"
    assert llama("\u2581the") == " the" and llama("<0x0A>") == "\n" and llama("</s>") == "</s>"
    assert qwen("<|endoftext|>") == "<|endoftext|>"
    # A CJK character is the same bytes whichever way it was split.
    text = "你好 the"
    for name, norm in (("gpt2-base", gpt2), ("Qwen1.5-1.8B", qwen),
                       ("tinyllama-1.1b-3T", llama)):
        tok = tokenizers[name]
        ids = tok(text, add_special_tokens=False)["input_ids"]
        joined = "".join(norm.tokens(tok, ids)).encode("latin-1").decode("utf-8")
        assert joined.strip() == text


@pytest.mark.parametrize("kind", ["bpe", "unigram", "wordpiece", "char"])
def test_token_normalizer_project_tokenizers(kind):
    """The tokenizers the pipeline trains for its tiny models normalise back to their text."""
    modeling = pytest.importorskip("cot2align_core.modeling")
    texts = ["Below is an instruction.\n\n### Response:\nThe answer is 42, ok?",
             "h\u00e9llo w\u00f6rld \u4f60\u597d 12345 the cat sat"] * 3
    tok = modeling.train_tokenizer(texts, kind, 120)
    norm = TokenNormalizer.from_tokenizer(tok)
    text = "The answer is 42, h\u00e9llo \u4f60\u597d\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert "".join(norm.tokens(tok, ids)).encode("latin-1").decode("utf-8") == text
    assert norm(tok.eos_token) == tok.eos_token


@pytest.mark.parametrize("teacher,student", [("Qwen1.5-1.8B", "gpt2-base"),
                                             ("gpt2-base", "tinyllama-1.1b-3T")])
def test_same_spelling_pairs_real_tokenizers(tokenizers, teacher, student):
    """The anchors of ``ot.map_init: anchors``: one pair per shared spelling, ids unique on
    both sides, specials left out but the two EOS paired, byte-level and byte-fallback bytes
    paired with each other."""
    tt, st = tokenizers[teacher], tokenizers[student]
    s_ids, t_ids = same_spelling_pairs(tt, st)
    assert len(set(s_ids)) == len(s_ids) == len(t_ids) == len(set(t_ids))
    assert s_ids == sorted(s_ids)
    s_norm, t_norm = TokenNormalizer.from_tokenizer(st), TokenNormalizer.from_tokenizer(tt)
    s_tok, t_tok = st.convert_ids_to_tokens(s_ids), tt.convert_ids_to_tokens(t_ids)
    pairs = dict(zip(s_ids, t_ids))
    assert pairs[st.eos_token_id] == tt.eos_token_id
    for s, t, a, b in zip(s_ids, t_ids, s_tok, t_tok):
        if s != st.eos_token_id:
            assert s_norm(a) == t_norm(b) and s_norm(a), (a, b)
            assert s not in st.all_special_ids and t not in tt.all_special_ids
    by_token = dict(zip(s_tok, t_tok))
    if student == "gpt2-base":  # GPT-2's byte-level BPE is nearly all inside Qwen's
        assert len(s_ids) > 40_000 and by_token["\u0120the"] == "\u0120the"
    else:
        assert len(s_ids) > 10_000
        assert by_token["\u2581the"] == "\u0120the" and by_token["<0x0A>"] == "\u010a"
    # Only ids the embedding matrices have.
    s_cut, t_cut = same_spelling_pairs(tt, st, teacher_vocab_size=1000, student_vocab_size=500)
    assert s_cut and max(s_cut) < 500 and max(t_cut) < 1000


def test_vocab_mapping_qwen_to_gpt2(tokenizers):
    qwen, gpt2 = tokenizers["Qwen1.5-1.8B"], tokenizers["gpt2-base"]
    start = time.perf_counter()
    mapping = build_vocab_mapping(qwen, gpt2, teacher_vocab_size=151936)
    elapsed = time.perf_counter() - start
    print(f"Qwen1.5 -> GPT-2 vocabulary mapping: {elapsed:.1f} s")
    assert elapsed < 90
    assert mapping.shape == (151936,) and mapping.dtype == np.int64
    assert mapping.min() >= 0 and mapping.max() < len(gpt2)
    q_norm, g_norm = TokenNormalizer.from_tokenizer(qwen), TokenNormalizer.from_tokenizer(gpt2)
    q_str = q_norm.vocab(qwen)
    g_str = g_norm.vocab(gpt2)
    for word in (" the", " The", "the", ",", "\n", " distillation", " 2024", "ing"):
        q_ids = qwen(word, add_special_tokens=False)["input_ids"]
        g_ids = gpt2(word, add_special_tokens=False)["input_ids"]
        if len(q_ids) == 1 and len(g_ids) == 1:
            assert mapping[q_ids[0]] == g_ids[0], word
    assert mapping[qwen.eos_token_id] == gpt2.eos_token_id
    assert (mapping[len(qwen):] == gpt2.unk_token_id).all()  # padded embedding rows
    # Every string that exists in both vocabularies maps onto itself.
    g_index = {s: j for j, s in enumerate(g_str)}
    exact = [(i, g_index[s]) for i, s in enumerate(q_str) if s in g_index]
    assert len(exact) > 40000
    assert all(g_str[mapping[i]] == q_str[i] for i, _ in exact)
    # The others: minimum edit distance within the bucket, checked by brute force on a sample.
    rng = random.Random(0)
    others = [i for i, s in enumerate(q_str) if s not in g_index and s]
    for i in rng.sample(others, 15):
        t = q_str[i]
        key = t[:2] if t[0] == " " else t[:1]
        cands = [s for s in g_str if s and (s[:2] if s[0] == " " else s[:1]) == key]
        if cands:
            assert edit_distance(t, g_str[mapping[i]]) == min(edit_distance(t, s) for s in cands)
    assert g_str[mapping[q_str.index(" enzym")]] in (" enzyme", " enzy")


def test_vocab_mapping_sentencepiece_to_byte_level(tokenizers):
    llama, gpt2 = tokenizers["tinyllama-1.1b-3T"], tokenizers["gpt2-base"]
    mapping = build_vocab_mapping(llama, gpt2)
    assert mapping.shape == (len(llama),) and mapping.max() < len(gpt2)
    g = gpt2.convert_tokens_to_ids
    assert mapping[llama.convert_tokens_to_ids("\u2581the")] == g("\u0120the")
    assert mapping[llama.convert_tokens_to_ids("<0x0A>")] == g("\u010a")
    assert mapping[llama.eos_token_id] == gpt2.eos_token_id
    # Into a SentencePiece student, a string that is both a regular and a byte-fallback token
    # ("▁" and "<0x20>") goes to the regular one; everything else maps onto itself.
    same = build_vocab_mapping(llama, llama)
    space = llama.convert_tokens_to_ids("\u2581")
    assert same[llama.convert_tokens_to_ids("<0x20>")] == space and same[space] == space
    assert same[llama.convert_tokens_to_ids("<0x0A>")] == llama.convert_tokens_to_ids("<0x0A>")
    moved = np.nonzero(same != np.arange(len(llama)))[0]
    assert 0 < len(moved) < 100
    assert all(llama.convert_ids_to_tokens(int(i)).startswith("<0x") for i in moved)


def test_alignment_on_real_tokenizations_is_fast_and_sensible(tokenizers):
    qwen, gpt2 = tokenizers["Qwen1.5-1.8B"], tokenizers["gpt2-base"]
    qn, gn = TokenNormalizer.from_tokenizer(qwen), TokenNormalizer.from_tokenizer(gpt2)
    text = ("Dual-space distillation aligns 12345 tokens; the teacher's rationale 你好 helps. "
            "Therefore, the answer is: 42.\n") * 12
    t = qn.tokens(qwen, qwen(text, add_special_tokens=False)["input_ids"])[:512]
    s = gn.tokens(gpt2, gpt2(text, add_special_tokens=False)["input_ids"])[:512]
    start = time.perf_counter()
    pairs = min_edit_alignment(t, s)
    elapsed = time.perf_counter() - start
    print(f"alignment of {len(t)} x {len(s)} tokens: {elapsed * 1000:.0f} ms")
    assert elapsed < 5
    al = alignment_tensor(pairs, len(s)).tolist()
    # identical tokens at the start are matched one to one
    k = 0
    while t[k] == s[k]:
        assert al[k] == k
        k += 1
    # words tokenised alike in both are aligned to each other
    same = sum(1 for j, i in enumerate(al) if i >= 0 and t[i] == s[j])
    assert same > 0.5 * len(s)
    for word in (" teacher", " rationale", " Therefore", " answer"):
        assert all(t[al[j]] == word for j in range(len(s)) if s[j] == word)


# ------------------------------------------------------------------------------- loss
def _naive_mined(zs, ms, ids, zt, mt, align, vmap, T):
    vals = []
    B, R_s, V_s = zs.shape
    for b in range(B):
        for r in range(R_s):
            a = int(align[b, r])
            if not ms[b, r] or a < 0 or a >= zt.shape[1] or not mt[b, a]:
                continue
            p = np.exp(zt[b, a].numpy() / T - (zt[b, a].numpy() / T).max())
            p /= p.sum()
            pm = np.zeros(V_s)
            for k in range(len(p)):
                pm[vmap[int(ids[b, a, k])]] += p[k]
            z = zs[b, r].numpy() / T
            lq = z - (math.log(np.exp(z - z.max()).sum()) + z.max())
            vals.append(sum(pm[v] * (math.log(pm[v]) - lq[v]) for v in range(V_s) if pm[v] > 0))
    return sum(vals) / len(vals)


def _mined_inputs(seed, B=3, R_s=6, R_t=5, V_s=7, V_t=10, k=4):
    gen = torch.Generator().manual_seed(seed)
    zs = torch.randn(B, R_s, V_s, generator=gen, dtype=torch.float64)
    zt_full = torch.randn(B, R_t, V_t, generator=gen, dtype=torch.float64) * 2
    top = zt_full.topk(k, dim=-1)
    ms = torch.rand(B, R_s, generator=gen) < 0.8
    mt = torch.arange(R_t)[None] < torch.tensor([5, 3, 4][:B])[:, None]
    align = torch.randint(-1, R_t + 1, (B, R_s), generator=gen)  # includes -1 and R_t (invalid)
    vmap = torch.randint(0, V_s, (V_t,), generator=gen)
    vmap[:3] = 2  # several teacher ids onto one student id
    return zs, ms, zt_full, top, mt, align, vmap


def test_mined_kd_loss_matches_naive_and_full_logits_path():
    zs, ms, zt_full, top, mt, align, vmap = _mined_inputs(20)
    got = mined_kd_loss(zs, ms, top.indices, top.values, mt, align, vmap.numpy(), temperature=1.7)
    want = _naive_mined(zs, ms, top.indices, top.values, mt, align, vmap.tolist(), 1.7)
    assert got.item() == pytest.approx(want, rel=1e-9)
    V_t = zt_full.shape[-1]
    full = mined_kd_loss(zs, ms, None, zt_full, mt, align, vmap, temperature=1.7)
    ids_all = torch.arange(V_t).expand(*zt_full.shape[:2], V_t)
    assert full.item() == pytest.approx(
        _naive_mined(zs, ms, ids_all, zt_full, mt, align, vmap.tolist(), 1.7), rel=1e-9)


def test_mined_kd_loss_gradcheck_and_edge_cases():
    zs, ms, zt_full, top, mt, align, vmap = _mined_inputs(21, B=2, R_s=3, R_t=3, V_s=5, V_t=6, k=3)
    zs.requires_grad_(True)
    align = torch.tensor([[0, 2, -1], [1, 0, 2]])
    assert torch.autograd.gradcheck(
        lambda z: mined_kd_loss(z, ms, top.indices, top.values, mt, align, vmap, temperature=2.0),
        (zs,))
    none = mined_kd_loss(zs, ms, top.indices, top.values, mt, torch.full_like(align, -1), vmap)
    assert none.item() == 0.0
    with pytest.raises(ValueError, match="vocab_map"):
        mined_kd_loss(zs, ms, top.indices, top.values, mt, align, vmap + 10)
    with pytest.raises(ValueError, match=r"\[B, R_s\]"):
        mined_kd_loss(zs, ms, top.indices, top.values, mt, align[:, :2], vmap)
    with pytest.raises(ValueError, match="teacher"):
        mined_kd_loss(zs, ms, top.indices, top.values[..., :2], mt, align, vmap)
