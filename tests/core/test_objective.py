"""The CoT2Align objective on tiny models: composition, cross terms, missing forms, KD bases."""
from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from cot2align_core.losses import response_ce, response_positions
from cot2align_core.objective import (CoT2AlignObjective, ObjectiveWeights, OTSettings,
                                      StudentBatch, TeacherBatch)
from cot2align_core.ot import ot_alignment_loss

V_S, D_S, V_T, D_T = 50, 32, 40, 24


def _gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=D_S, n_layer=2, n_head=2, vocab_size=V_S, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def _student(gen, present, *, T=14, prompt=(2, 5), resp=(2, 8)):
    B = len(present)
    ids = torch.zeros(B, T, dtype=torch.long)
    am = torch.zeros(B, T, dtype=torch.long)
    rm = torch.zeros(B, T, dtype=torch.long)
    for b, here in enumerate(present):
        if not here:
            continue
        p = int(torch.randint(prompt[0], prompt[1] + 1, (1,), generator=gen))
        r = int(torch.randint(resp[0], resp[1] + 1, (1,), generator=gen))
        ids[b, : p + r] = torch.randint(1, V_S, (p + r,), generator=gen)
        am[b, : p + r] = 1
        rm[b, p: p + r] = 1
    return StudentBatch(input_ids=ids, attention_mask=am, response_mask=rm,
                        present=torch.tensor(present, dtype=torch.bool))


def _teacher(gen, present, *, R=9, vocab=V_T, k=8):
    B = len(present)
    n = [int(torch.randint(2, R + 1, (1,), generator=gen)) if here else 0 for here in present]
    mask = torch.arange(R)[None] < torch.tensor(n)[:, None]
    logits = torch.randn(B, R, vocab, generator=gen) * 2
    top = logits.topk(k, dim=-1)
    return TeacherBatch(
        hidden=(torch.randn(B, 1, R, D_T, generator=gen) * 4).half(),
        mask=mask,
        input_ids=torch.randint(0, V_T, (B, R), generator=gen),
        target_ids=torch.randint(0, vocab, (B, R), generator=gen),
        present=torch.tensor(present, dtype=torch.bool),
        topk_ids=top.indices, topk_logits=top.values, layers=(-1,),
    )


PRESENT_STD = [True, True, True, True]
PRESENT_COT = [True, False, True, False]


def _batch(seed=0, present_cot=PRESENT_COT, teacher_vocab=V_T):
    gen = torch.Generator().manual_seed(seed)
    student = {"standard": _student(gen, PRESENT_STD), "cot": _student(gen, present_cot, T=20,
                                                                      resp=(5, 14))}
    teacher = {"standard": _teacher(gen, PRESENT_STD, vocab=teacher_vocab),
               "cot": _teacher(gen, present_cot, R=16, vocab=teacher_vocab)}
    embed = torch.randn(V_T, D_T, generator=gen) * 0.05
    head = torch.randn(teacher_vocab, D_T, generator=gen)
    return student, teacher, embed, head


def _single_run(model, sb, b):
    """Run the model on example b alone; hidden states at its prediction positions."""
    n = int(sb.attention_mask[b].sum())
    ids = sb.input_ids[b: b + 1, :n]
    out = model(input_ids=ids, output_hidden_states=True)
    index, mask = response_positions(sb.response_mask[b: b + 1, :n])
    pos = index[0][mask[0]]
    return out, pos, ids


def _rms(x):
    return x / x.pow(2).mean(-1, keepdim=True).sqrt()


# ------------------------------------------------------------------------------- SFT
def test_alpha_zero_is_response_ce_without_teacher():
    model = _gpt2()
    student, *_ = _batch(1)
    obj = CoT2AlignObjective(ObjectiveWeights(alpha=0.0), student_dim=D_S)
    assert obj.projector is None and obj.projector_parameters() == []
    sb = student["standard"]
    loss, terms = obj(model, {"standard": sb})
    want = response_ce(model(input_ids=sb.input_ids, attention_mask=sb.attention_mask).logits,
                       sb.input_ids, sb.response_mask)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert terms["ce"] == pytest.approx(want.item(), rel=1e-5) and terms["ot"] == 0.0
    # Two forms: the sum of the two CEs, the CoT one over the rows that have it.
    loss2, terms2 = obj(model, student)
    cot = student["cot"]
    rows = cot.present
    want_cot = response_ce(model(input_ids=cot.input_ids[rows],
                                 attention_mask=cot.attention_mask[rows]).logits,
                           cot.input_ids[rows], cot.response_mask[rows])
    assert loss2.item() == pytest.approx(want.item() + want_cot.item(), rel=1e-5)
    assert terms2["ce/cot"] == pytest.approx(want_cot.item(), rel=1e-5)


# ------------------------------------------------------------------------------- composition
def test_objective_equals_naive_per_example_composition():
    model = _gpt2(2)
    student, teacher, embed, _ = _batch(2)
    pairs = {"main": 1.0, "cross_a": 0.7, "cross_b": 0.4}
    ot = OTSettings(pairs=pairs, weight=0.9, layers=("embedding", "last"))
    obj = CoT2AlignObjective(ObjectiveWeights(alpha=0.3, ot=ot), student_dim=D_S,
                             teacher_dim=D_T)
    loss, terms = obj(model, student, teacher, teacher_embed=embed)

    P = obj.projector
    ce = 0.0
    for f, sb in student.items():
        rows = sb.present
        out = model(input_ids=sb.input_ids[rows], attention_mask=sb.attention_mask[rows])
        ce += response_ce(out.logits, sb.input_ids[rows], sb.response_mask[rows]).item()
    combos = {"main": [("standard", "standard"), ("cot", "cot")],
              "cross_a": [("standard", "cot")], "cross_b": [("cot", "standard")]}
    total_ot = 0.0
    for pair, w in pairs.items():
        for sf, tf in combos[pair]:
            for layer in ("embedding", "last"):
                vals = []
                for b in range(4):
                    if not (student[sf].present[b] and teacher[tf].present[b]):
                        continue
                    out, pos, _ = _single_run(model, student[sf], b)
                    hs = out.hidden_states[0 if layer == "embedding" else -1][0, pos]
                    tb = teacher[tf]
                    m = int(tb.mask[b].sum())
                    if layer == "embedding":
                        ht = embed[tb.input_ids[b, :m]]
                    else:
                        ht = tb.hidden[b, 0, :m].float()
                    y = P(_rms(ht))
                    vals.append(ot_alignment_loss(hs[None], y[None]).item())
                if vals:
                    key = f"ot/{pair}/{sf}-{tf}/{layer}"
                    assert terms[key] == pytest.approx(sum(vals) / len(vals), rel=1e-4), key
                    total_ot += w * sum(vals) / len(vals)
    want = 0.7 * ce + 0.3 * 0.9 * total_ot
    assert terms["ce"] == pytest.approx(ce, rel=1e-5)
    assert loss.item() == pytest.approx(want, rel=1e-4)


# ------------------------------------------------------------------------------- cross terms
@pytest.mark.parametrize("pair,key", [("cross_a", "ot/cross_a/standard-cot"),
                                      ("cross_b", "ot/cross_b/cot-standard")])
def test_each_cross_term_trains_student_and_projector(pair, key):
    model = _gpt2(3)
    student, teacher, embed, _ = _batch(3)
    obj = CoT2AlignObjective(ObjectiveWeights(alpha=1.0, ot=OTSettings(pairs={pair: 1.0})),
                             student_dim=D_S, teacher_dim=D_T)
    loss, terms = obj(model, student, teacher, teacher_embed=embed)
    assert terms[f"{key}/last"] > 0 and terms[f"{key}/embedding"] > 0
    assert loss.item() == pytest.approx(terms[f"{key}/last"] + terms[f"{key}/embedding"], rel=1e-5)
    loss.backward()
    for name in ("transformer.wte.weight", "transformer.h.1.mlp.c_fc.weight",
                 "transformer.ln_f.weight"):
        g = model.get_parameter(name).grad
        assert g is not None and g.abs().sum() > 0, name
    for p in obj.projector_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_defaults_train_both_cross_terms():
    weights = ObjectiveWeights()
    assert weights.ot.pairs == {"main": 1.0, "cross_a": 1.0, "cross_b": 1.0}
    student, teacher, embed, _ = _batch(4)
    grads = {}
    for pair in ("cross_a", "cross_b"):
        model = _gpt2(4)
        torch.manual_seed(0)
        obj = CoT2AlignObjective(ObjectiveWeights(), student_dim=D_S, teacher_dim=D_T)
        # Gradient of the defaults' loss with and without this pair: the difference is its own.
        loss, terms = obj(model, student, teacher, teacher_embed=embed)
        forms = "standard-cot" if pair == "cross_a" else "cot-standard"
        assert terms[f"ot/{pair}/{forms}/last"] > 0
        params = [model.transformer.h[0].attn.c_attn.weight, obj.projector.weight]
        full = torch.autograd.grad(loss, params)
        obj.weights.ot.pairs[pair] = 0.0
        loss2, _ = obj(model, student, teacher, teacher_embed=embed)
        part = torch.autograd.grad(loss2, params)
        grads[pair] = [(a - b).abs().sum().item() for a, b in zip(full, part)]
    for pair, (g_student, g_proj) in grads.items():
        assert g_student > 0 and g_proj > 0, pair


# ------------------------------------------------------------------------------- missing forms
class _Recorder(torch.nn.Module):
    """Wraps a model and records the rows it is run on."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.calls = []

    def forward(self, input_ids, attention_mask, **kw):
        self.calls.append((input_ids.clone(), attention_mask.clone()))
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kw)

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()


def test_missing_forms_are_not_run_and_contribute_nothing():
    model = _Recorder(_gpt2(5))
    student, teacher, embed, _ = _batch(5)
    obj = CoT2AlignObjective(ObjectiveWeights(alpha=0.5), student_dim=D_S, teacher_dim=D_T)
    loss, terms = obj(model, student, teacher, teacher_embed=embed)
    assert [c[0].shape[0] for c in model.calls] == [4, 2]  # cot: only the 2 rows that have it
    for _, am in model.calls:
        assert (am.sum(1) > 0).all()  # never an all-masked sequence
    # Garbage in the cot rows of the examples without cot changes nothing.
    gen = torch.Generator().manual_seed(99)
    absent = ~student["cot"].present
    cot = student["cot"]
    cot.input_ids[absent] = torch.randint(1, V_S, cot.input_ids[absent].shape, generator=gen)
    cot.attention_mask[absent] = 1
    cot.response_mask[absent, 3:] = 1
    tc = teacher["cot"]
    tc.hidden[absent] = torch.randn(tc.hidden[absent].shape, generator=gen).half()
    loss2, terms2 = obj(model, student, teacher, teacher_embed=embed)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-6)
    assert terms2 == pytest.approx(terms, rel=1e-6)


def test_batch_without_cot_runs_once_and_skips_cot_pairs():
    model = _Recorder(_gpt2(6))
    student, teacher, embed, _ = _batch(6, present_cot=[False] * 4)
    obj = CoT2AlignObjective(ObjectiveWeights(alpha=0.5), student_dim=D_S, teacher_dim=D_T)
    loss, terms = obj(model, student, teacher, teacher_embed=embed)
    assert len(model.calls) == 1
    assert not any(k.startswith(("ot/cross", "ot/main/cot")) for k in terms)
    assert "ot/main/standard-standard/last" in terms
    assert torch.isfinite(loss)


# ------------------------------------------------------------------------------- KD bases
def _alignment(student, teacher):
    """A simple alignment for the tests: r -> r on the common length, -1 beyond, one gap."""
    out = {}
    for f, sb in student.items():
        _, mask = response_positions(sb.response_mask)
        al = torch.full(mask.shape, -1, dtype=torch.long)
        for b in range(mask.shape[0]):
            n = min(int(mask[b].sum()), int(teacher[f].mask[b].sum()))
            al[b, :n] = torch.arange(n)
            if n > 2:
                al[b, 1] = -1
        out[f] = StudentBatch(sb.input_ids, sb.attention_mask, sb.response_mask, sb.present,
                              mined_alignment=al)
    return out


@pytest.mark.parametrize("kd_base", ["uld", "mined", "dskd", "forward_kl", "js", "tvd"])
def test_kd_bases_run_and_train(kd_base):
    same_vocab = kd_base not in ("uld", "mined", "dskd")
    student, teacher, embed, head = _batch(7, teacher_vocab=V_S if same_vocab else V_T)
    if kd_base == "mined":
        student = _alignment(student, teacher)
    model = _gpt2(7)
    vmap = torch.randint(0, V_S, (V_T,), generator=torch.Generator().manual_seed(0))
    obj = CoT2AlignObjective(ObjectiveWeights(alpha=0.5, kd_base=kd_base, ot=None),
                             student_dim=D_S, teacher_dim=D_T, vocab_map=vmap)
    assert obj.projector is None
    loss, terms = obj(model, student, teacher, teacher_embed=embed, teacher_head=head)
    assert torch.isfinite(loss) and terms["kd"] > 0
    assert terms["kd"] == pytest.approx(terms["kd/standard"] + terms["kd/cot"], rel=1e-5)
    assert loss.item() == pytest.approx(0.5 * terms["ce"] + 0.5 * terms["kd"], rel=1e-5)
    loss.backward()
    assert model.transformer.h[1].mlp.c_proj.weight.grad.abs().sum() > 0
    if kd_base == "dskd":
        assert {"kd/standard/t2s_ce", "kd/cot/s2t_kd"} <= set(terms)
        for p in obj.projector_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0


def test_same_vocab_kd_is_zero_against_itself_and_uses_head_without_topk():
    model = _gpt2(8)
    student, teacher, embed, head = _batch(8, teacher_vocab=V_S)
    sb = student["standard"]
    out = model(input_ids=sb.input_ids, attention_mask=sb.attention_mask)
    index, mask = response_positions(sb.response_mask)
    logits = out.logits[torch.arange(4)[:, None], index].detach()
    R = mask.shape[1]
    top = logits.topk(V_S, -1)
    tb = TeacherBatch(hidden=torch.zeros(4, 1, R, D_T), mask=mask,
                      input_ids=torch.zeros_like(index), target_ids=torch.zeros_like(index),
                      present=sb.present, topk_ids=top.indices, topk_logits=top.values)
    for kind in ("forward_kl", "reverse_kl", "js"):
        obj = CoT2AlignObjective(ObjectiveWeights(alpha=0.5, kd_base=kind, ot=None),
                                 student_dim=D_S)
        _, terms = obj(model, {"standard": sb}, {"standard": tb})
        assert abs(terms["kd"]) < 1e-5
    # Without a top-k cache the teacher logits come from its last layer and LM head.
    no_topk = TeacherBatch(**{**teacher["standard"].__dict__, "topk_ids": None,
                              "topk_logits": None})
    obj = CoT2AlignObjective(ObjectiveWeights(alpha=0.5, kd_base="uld", ot=None), student_dim=D_S)
    _, terms = obj(model, {"standard": sb}, {"standard": no_topk}, teacher_head=head)
    assert terms["kd"] > 0
    with pytest.raises(ValueError, match="teacher_head|top-k"):
        obj(model, {"standard": sb}, {"standard": no_topk})


def test_llama_student_with_all_terms():
    torch.manual_seed(9)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=D_S, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2,
                                         vocab_size=V_S, max_position_embeddings=64))
    student, teacher, embed, head = _batch(9)
    obj = CoT2AlignObjective(ObjectiveWeights(alpha=0.9, kd_base="dskd"), student_dim=D_S,
                             teacher_dim=D_T)
    loss, terms = obj(model, student, teacher, teacher_embed=embed, teacher_head=head)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in obj.projector_parameters())
    assert len(obj.projector_parameters()) == 2 + 6  # projector + CMA's three linears


# ------------------------------------------------------------------------------- errors
def test_errors():
    model = _gpt2()
    student, teacher, embed, _ = _batch(10)
    with pytest.raises(ValueError, match="kd_base"):
        ObjectiveWeights(kd_base="kl")
    with pytest.raises(ValueError, match="pairs"):
        OTSettings(pairs={"cross_c": 1.0})
    with pytest.raises(ValueError, match="layers"):
        OTSettings(layers=("middle",))
    with pytest.raises(ValueError, match="alpha"):
        ObjectiveWeights(alpha=1.5)
    with pytest.raises(ValueError, match="vocab_map"):
        CoT2AlignObjective(ObjectiveWeights(kd_base="mined"), student_dim=D_S, teacher_dim=D_T)
    with pytest.raises(ValueError, match="teacher_dim"):
        CoT2AlignObjective(ObjectiveWeights(), student_dim=D_S)
    obj = CoT2AlignObjective(ObjectiveWeights(), student_dim=D_S, teacher_dim=D_T)
    with pytest.raises(ValueError, match="teacher batches"):
        obj(model, student)
    bad = dict(teacher)
    bad["cot"] = TeacherBatch(**{**teacher["cot"].__dict__,
                                 "present": torch.ones(4, dtype=torch.bool)})
    with pytest.raises(ValueError, match="present"):
        obj(model, student, bad, teacher_embed=embed)
    with pytest.raises(ValueError, match="teacher_embed"):
        obj(model, student, teacher)
    with pytest.raises(ValueError, match="packed left"):
        TeacherBatch(**{**teacher["cot"].__dict__, "mask": teacher["cot"].mask.flip(1)})
    with pytest.raises(ValueError, match="input_ids"):
        TeacherBatch(**{**teacher["cot"].__dict__,
                        "input_ids": torch.zeros(4, 3, dtype=torch.long)})
