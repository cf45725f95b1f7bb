"""The CoT2Align objective on tiny models: composition, cross terms, missing forms, KD bases."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from cot2align_core.config import ObjectiveConfig, OTConfig
from cot2align_core.losses import response_ce, response_positions
from cot2align_core.objective import (CoT2AlignObjective, OTAlignment, StudentBatch,
                                      TeacherBatch, hidden_index, teacher_layers_needed)
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
    obj = CoT2AlignObjective(ObjectiveConfig(alpha=0.0), student_dim=D_S)
    assert obj.ot is None and obj.kd is None and obj.projector_parameters() == []
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

def _naive_states(obj, model, student, teacher, embed, sf, tf, layer, b):
    """Both sides of one example and layer, computed directly from the definitions."""
    out, pos, ids = _single_run(model, student[sf], b)
    tb = teacher[tf]
    m = int(tb.mask[b].sum())
    if layer == "embedding":  # the response tokens' own embeddings, EOS included
        hs = model.get_input_embeddings().weight[ids[0, pos + 1]]
        ht = embed[tb.target_ids[b, :m]]
    else:
        L = len(out.hidden_states) - 1
        hs = out.hidden_states[hidden_index(layer, L)][0, pos]
        ht = tb.hidden[b, list(tb.layers).index(-1 if layer == "last" else 2), :m].float()
    ot = obj.ot
    if ot.maps is not None:
        return ot.maps[ot.names.index(str(layer))](_rms(hs)), _rms(ht)
    return _rms(hs), ot.projector(_rms(ht))


# ------------------------------------------------------------------------------- composition
@pytest.mark.parametrize("space", ["teacher", "student"])
def test_objective_equals_naive_per_example_composition(space):
    model = _gpt2(2)
    student, teacher, embed, _ = _batch(2)
    pairs = {"main": 1.0, "cross_a": 0.7, "cross_b": 0.4}
    ot = OTConfig(pairs=pairs, weight=0.9, layers=["embedding", "last"], space=space)
    obj = CoT2AlignObjective(ObjectiveConfig(alpha=0.3, kd_base="none", ot=ot), student_dim=D_S,
                             teacher_dim=D_T)
    loss, terms = obj(model, student, teacher, teacher_embed=embed)

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
                    x, y = _naive_states(obj, model, student, teacher, embed, sf, tf, layer, b)
                    vals.append(ot_alignment_loss(x[None], y[None], eps=0.05,
                                                  max_iter=ot.max_iter).item())
                if vals:
                    key = f"ot/{pair}/{sf}-{tf}/{layer}"
                    assert terms[key] == pytest.approx(sum(vals) / len(vals), rel=1e-4), key
                    total_ot += w * sum(vals) / len(vals)
    want = 0.7 * ce + 0.3 * 0.9 * total_ot
    assert terms["ce"] == pytest.approx(ce, rel=1e-5)
    assert loss.item() == pytest.approx(want, rel=1e-4)


def test_intermediate_layer_maps_depth_fractions_to_both_models():
    """Layer 0.5: the student's hidden_states[1] (2 blocks), the teacher's cached index 2 (4)."""
    model = _gpt2(11)
    student, teacher, embed, _ = _batch(11)
    gen = torch.Generator().manual_seed(11)
    for tb in teacher.values():  # cache layers 2 and -1 of a 4-layer teacher
        tb.hidden = torch.cat([torch.randn(tb.hidden.shape, generator=gen).half(), tb.hidden], 1)
        tb.layers = (2, -1)
    cfg = ObjectiveConfig(alpha=1.0, kd_base="none",
                          ot=OTConfig(layers=[0.5], pairs={"main": 1.0}))
    assert teacher_layers_needed(cfg, 4) == [2, -1]
    obj = CoT2AlignObjective(cfg, student_dim=D_S, teacher_dim=D_T, teacher_num_layers=4)
    _, terms = obj(model, student, teacher, teacher_embed=embed)
    vals = [ot_alignment_loss(*(v[None] for v in _naive_states(
        obj, model, student, teacher, embed, "standard", "standard", 0.5, b)),
        max_iter=cfg.ot.max_iter).item() for b in range(4)]
    assert terms["ot/main/standard-standard/0.5"] == pytest.approx(sum(vals) / 4, rel=1e-4)
    with pytest.raises(ValueError, match="teacher_num_layers"):
        CoT2AlignObjective(cfg, student_dim=D_S, teacher_dim=D_T)


def test_layer_index_mapping():
    assert [hidden_index(0.5, n) for n in (2, 3, 4, 5, 12)] == [1, 2, 2, 3, 6]
    assert hidden_index("last", 7) == 7 and hidden_index(0.01, 4) == 1
    assert hidden_index(0.99, 4) == 4
    cfg = ObjectiveConfig(ot=OTConfig(layers=["embedding", 0.25, 0.5, 0.99, "last"]))
    assert teacher_layers_needed(cfg, 8) == [2, 4, -1]
    assert teacher_layers_needed(ObjectiveConfig(alpha=0.0), 8) == [-1]
    assert teacher_layers_needed(ObjectiveConfig(ot=None), 8) == [-1]


# ------------------------------------------------------------------------------- embedding layer
@pytest.mark.parametrize("space", ["teacher", "student"])
def test_embedding_term_never_touches_position_embeddings(space):
    model = _gpt2(12)
    student, teacher, embed, _ = _batch(12)
    cfg = ObjectiveConfig(alpha=1.0, kd_base="none",
                          ot=OTConfig(layers=["embedding"], space=space))
    obj = CoT2AlignObjective(cfg, student_dim=D_S, teacher_dim=D_T)
    loss, _ = obj(model, student, teacher, teacher_embed=embed)
    loss.backward()
    wpe = model.transformer.wpe.weight.grad
    assert wpe is None or torch.count_nonzero(wpe) == 0
    wte = model.transformer.wte.weight.grad
    # Only the rows of response tokens (EOS included) get a gradient.
    response = set()
    for sb in student.values():
        for b in range(4):
            if sb.present[b]:
                response |= set(sb.input_ids[b][sb.response_mask[b].bool()].tolist())
    touched = set(torch.nonzero(wte.abs().sum(1)).squeeze(1).tolist())
    assert touched and touched <= response


def test_embedding_token_sets_are_the_response_tokens():
    """The teacher side reads target_ids (the response tokens, EOS included), never input_ids."""
    model = _gpt2(13)
    student, teacher, embed, _ = _batch(13)
    cfg = ObjectiveConfig(alpha=1.0, kd_base="none",
                          ot=OTConfig(layers=["embedding"], pairs={"main": 1.0}))
    obj = CoT2AlignObjective(cfg, student_dim=D_S, teacher_dim=D_T)
    _, terms = obj(model, student, teacher, teacher_embed=embed)
    gen = torch.Generator().manual_seed(1)
    for tb in teacher.values():
        tb.input_ids = torch.randint(0, V_T, tb.input_ids.shape, generator=gen)
    _, same = obj(model, student, teacher, teacher_embed=embed)
    assert same == pytest.approx(terms, rel=1e-6)
    # The student side: the embeddings of the tokens each prediction position predicts.
    sb = student["standard"]
    run = obj._run_student(model, sb)
    for b in range(4):
        resp = sb.input_ids[b][sb.response_mask[b].bool()]
        n = int(run.mask[b].sum())
        assert torch.equal(run.target_ids[b, :n], resp)  # last one is the final token (EOS)
        assert torch.allclose(run.hidden["embedding"][b, :n], model.transformer.wte.weight[resp])


# ------------------------------------------------------------------------------- cross terms
@pytest.mark.parametrize("pair,key", [("cross_a", "ot/cross_a/standard-cot"),
                                      ("cross_b", "ot/cross_b/cot-standard")])
def test_each_cross_term_trains_student_and_maps(pair, key):
    model = _gpt2(3)
    student, teacher, embed, _ = _batch(3)
    obj = CoT2AlignObjective(ObjectiveConfig(alpha=1.0, kd_base="none",
                                             ot=OTConfig(pairs={pair: 1.0})),
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
    assert ObjectiveConfig().ot.pairs == {"main": 1.0, "cross_a": 1.0, "cross_b": 1.0}
    student, teacher, embed, head = _batch(4)
    grads = {}
    for pair in ("cross_a", "cross_b"):
        model = _gpt2(4)
        torch.manual_seed(0)
        obj = CoT2AlignObjective(ObjectiveConfig(), student_dim=D_S, teacher_dim=D_T)
        # Gradient of the defaults' loss with and without this pair: the difference is its own.
        loss, terms = obj(model, student, teacher, teacher_embed=embed, teacher_head=head)
        forms = "standard-cot" if pair == "cross_a" else "cot-standard"
        assert terms[f"ot/{pair}/{forms}/last"] > 0
        params = [model.transformer.h[0].attn.c_attn.weight, obj.ot.maps[1].weight]
        full = torch.autograd.grad(loss, params)
        obj.config.ot.pairs[pair] = 0.0
        loss2, _ = obj(model, student, teacher, teacher_embed=embed, teacher_head=head)
        part = torch.autograd.grad(loss2, params)
        grads[pair] = [(a - b).abs().sum().item() for a, b in zip(full, part)]
    for pair, (g_student, g_map) in grads.items():
        assert g_student > 0 and g_map > 0, pair


# ------------------------------------------------------------------------------- layer weights
def test_uncertainty_weighting_is_kendall_and_learns_the_log_variances():
    model = _gpt2(14)
    student, teacher, embed, _ = _batch(14)
    cfg = ObjectiveConfig(alpha=0.4, kd_base="none", ot=OTConfig(layer_weighting="uncertainty",
                                                                 weight=0.5))
    obj = CoT2AlignObjective(cfg, student_dim=D_S, teacher_dim=D_T)
    with torch.no_grad():
        obj.ot.log_vars.copy_(torch.tensor([0.3, -0.7]))
    loss, terms = obj(model, student, teacher, teacher_embed=embed)
    per_layer = {name: sum(v for k, v in terms.items()
                           if k.startswith("ot/") and k.endswith("/" + name)
                           and not k.startswith("ot/weight"))
                 for name in ("embedding", "last")}
    s = {"embedding": 0.3, "last": -0.7}
    ot = sum(math.exp(-s[n]) * per_layer[n] + s[n] for n in s)
    assert terms["ot"] == pytest.approx(ot, rel=1e-5)
    assert loss.item() == pytest.approx(0.6 * terms["ce"] + 0.4 * 0.5 * ot, rel=1e-5)
    assert terms["ot/weight/last"] == pytest.approx(math.exp(0.7), rel=1e-6)
    # d loss / d s_l = alpha w_ot (1 - exp(-s_l) OT_l)
    (g,) = torch.autograd.grad(loss, [obj.ot.log_vars])
    want = [0.4 * 0.5 * (1 - math.exp(-s[n]) * per_layer[n]) for n in ("embedding", "last")]
    assert g.tolist() == pytest.approx(want, rel=1e-4)


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
    student, teacher, embed, head = _batch(5)
    obj = CoT2AlignObjective(ObjectiveConfig(alpha=0.5), student_dim=D_S, teacher_dim=D_T)
    loss, terms = obj(model, student, teacher, teacher_embed=embed, teacher_head=head)
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
    loss2, terms2 = obj(model, student, teacher, teacher_embed=embed, teacher_head=head)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-6)
    assert terms2 == pytest.approx(terms, rel=1e-6)


def test_batch_without_cot_runs_once_and_skips_cot_pairs():
    model = _Recorder(_gpt2(6))
    student, teacher, embed, _ = _batch(6, present_cot=[False] * 4)
    obj = CoT2AlignObjective(ObjectiveConfig(alpha=0.5, kd_base="none"), student_dim=D_S,
                             teacher_dim=D_T)
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
    obj = CoT2AlignObjective(ObjectiveConfig(alpha=0.5, kd_base=kd_base, ot=None),
                             student_dim=D_S, teacher_dim=D_T, vocab_map=vmap)
    assert obj.ot is None
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


def test_kd_settings_reach_the_losses():
    """temperature, skew and dskd_divergence come from the config (per-base temperature)."""
    from cot2align_core.losses import kd_divergence, uld_loss

    model = _gpt2(15)
    student, teacher, embed, head = _batch(15, teacher_vocab=V_S)
    sb, tb = student["standard"], teacher["standard"]
    run_logits = CoT2AlignObjective(ObjectiveConfig(alpha=0.0), student_dim=D_S)._run_student(
        model, sb)
    full = TeacherBatch(**{**tb.__dict__, "topk_ids": None, "topk_logits": None})
    t_logits = full.layer(-1).float() @ head.T
    for cfg in (ObjectiveConfig(alpha=0.5, kd_base="skewed_forward_kl", skew=0.3, ot=None),
                ObjectiveConfig(alpha=0.5, kd_base="uld", ot=None)):
        obj = CoT2AlignObjective(cfg, student_dim=D_S)
        _, terms = obj(model, {"standard": sb}, {"standard": full}, teacher_head=head)
        R = min(run_logits.mask.shape[1], full.mask.shape[1])
        if cfg.kd_base == "uld":
            assert cfg.kd_temperature == 1.0
            want = uld_loss(run_logits.logits, run_logits.mask, t_logits, full.mask, temperature=1.0)
        else:
            assert cfg.kd_temperature == 2.0
            want = kd_divergence(run_logits.logits[:, :R], t_logits[:, :R],
                                 run_logits.mask[:, :R] & full.mask[:, :R],
                                 kind="skewed_forward_kl", temperature=2.0, skew=0.3)
        assert terms["kd"] == pytest.approx(want.item(), rel=1e-5)
    obj = CoT2AlignObjective(ObjectiveConfig(kd_base="dskd", dskd_divergence="js", ot=None),
                             student_dim=D_S, teacher_dim=D_T)
    assert obj.kd.divergence == "js" and obj.kd.temperature == 2.0


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
        obj = CoT2AlignObjective(ObjectiveConfig(alpha=0.5, kd_base=kind, ot=None),
                                 student_dim=D_S)
        _, terms = obj(model, {"standard": sb}, {"standard": tb})
        assert abs(terms["kd"]) < 1e-5
    # Without a top-k cache the teacher logits come from its last layer and LM head.
    no_topk = TeacherBatch(**{**teacher["standard"].__dict__, "topk_ids": None,
                              "topk_logits": None})
    obj = CoT2AlignObjective(ObjectiveConfig(alpha=0.5, kd_base="uld", ot=None), student_dim=D_S)
    _, terms = obj(model, {"standard": sb}, {"standard": no_topk}, teacher_head=head)
    assert terms["kd"] > 0
    with pytest.raises(ValueError, match="teacher_head|top-k"):
        obj(model, {"standard": sb}, {"standard": no_topk})


#: Every grid row the paper table declares: KD bases alone and with CoT2Align, the ablations,
#: the beyond-the-paper rows.
GRID = {
    "sft": dict(alpha=0.0, kd_base="none", ot=None),
    "dskd": dict(kd_base="dskd", ot=None),
    "uld": dict(kd_base="uld", ot=None),
    "mined": dict(kd_base="mined", ot=None),
    "dskd+cot2align": dict(kd_base="dskd"),
    "uld+cot2align": dict(kd_base="uld"),
    "mined+cot2align": dict(kd_base="mined"),
    "no_cross": dict(ot=OTConfig(pairs={"main": 1.0, "cross_a": 0.0, "cross_b": 0.0})),
    "no_cross_b": dict(ot=OTConfig(pairs={"main": 1.0, "cross_a": 1.0, "cross_b": 0.0})),
    "last_only": dict(ot=OTConfig(layers=["last"])),
    "student_space": dict(ot=OTConfig(space="student")),
    "intermediate": dict(ot=OTConfig(layers=["embedding", 0.5, "last"])),
    "uncertainty": dict(ot=OTConfig(layer_weighting="uncertainty")),
}


@pytest.mark.parametrize("row", list(GRID))
def test_every_grid_row_resolves_and_trains_a_few_steps(row):
    student, teacher, embed, head = _batch(16)
    student = _alignment(student, teacher)
    gen = torch.Generator().manual_seed(16)
    for tb in teacher.values():
        tb.hidden = torch.cat([torch.randn(tb.hidden.shape, generator=gen).half(), tb.hidden], 1)
        tb.layers = (2, -1)
    cfg = ObjectiveConfig.model_validate({k: (v.model_dump() if isinstance(v, OTConfig) else v)
                                          for k, v in GRID[row].items()})
    model = _gpt2(16)
    vmap = torch.randint(0, V_S, (V_T,), generator=torch.Generator().manual_seed(0))
    obj = CoT2AlignObjective(cfg, student_dim=D_S, teacher_dim=D_T, teacher_num_layers=4,
                             vocab_map=vmap)
    opt = torch.optim.AdamW(list(model.parameters()) + obj.projector_parameters(), lr=1e-3)
    for _ in range(3):
        loss, terms = obj(model, student, teacher, teacher_embed=embed, teacher_head=head)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all()
                   for p in obj.projector_parameters())
        opt.step()
    assert (terms["ot"] != 0) == cfg.uses_ot and (terms["kd"] != 0) == cfg.uses_kd


def test_llama_student_with_all_terms():
    torch.manual_seed(9)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=D_S, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2,
                                         vocab_size=V_S, max_position_embeddings=64))
    student, teacher, embed, head = _batch(9)
    obj = CoT2AlignObjective(ObjectiveConfig(alpha=0.9, kd_base="dskd"), student_dim=D_S,
                             teacher_dim=D_T)
    loss, terms = obj(model, student, teacher, teacher_embed=embed, teacher_head=head)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in obj.projector_parameters())
    assert len(obj.projector_parameters()) == 2 * 2 + 6  # a map per layer + CMA's three linears


# ------------------------------------------------------------------------------- health
def _synthetic_task(seed, n=24):
    """Sequences whose teacher states are a fixed function of the tokens, so that each
    example's own teacher is recoverable from the student and another's is not."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(V_S, D_T, generator=gen)
    emb = torch.randn(V_T, D_T, generator=gen)
    ids = torch.zeros(n, 12, dtype=torch.long)
    rm = torch.zeros(n, 12, dtype=torch.long)
    resp = []
    for b in range(n):
        ids[b] = torch.randint(1, V_S, (12,), generator=gen)
        rm[b, 4:] = 1
        resp.append(ids[b, 4:])
    sb = StudentBatch(input_ids=ids, attention_mask=torch.ones_like(ids), response_mask=rm,
                      present=torch.ones(n, dtype=torch.bool))
    inputs = torch.stack([ids[b, 3:11] for b in range(n)])  # tokens at the prediction positions
    targets = torch.stack(resp)
    tb = TeacherBatch(hidden=table[inputs].unsqueeze(1) + 0.1 * torch.randn(n, 1, 8, D_T, generator=gen),
                      mask=torch.ones(n, 8, dtype=torch.bool), input_ids=inputs % V_T,
                      target_ids=targets % V_T, present=sb.present, layers=(-1,))
    return {"standard": sb}, {"standard": tb}, emb


@pytest.mark.parametrize("kind,center", [("linear", False), ("orthogonal", False),
                                         ("linear", True)])
def test_health_after_training_keeps_spread_and_discrimination(kind, center):
    student, teacher, embed = _synthetic_task(17)
    model = _gpt2(17)
    cfg = ObjectiveConfig(alpha=0.5, kd_base="none",
                          ot=OTConfig(pairs={"main": 1.0}, map=kind, center=center))
    obj = CoT2AlignObjective(cfg, student_dim=D_S, teacher_dim=D_T)
    opt = torch.optim.AdamW(list(model.parameters()) + obj.projector_parameters(), lr=3e-3)
    for _ in range(60):
        loss, terms = obj(model, student, teacher, teacher_embed=embed)
        opt.zero_grad()
        loss.backward()
        opt.step()
    health = obj.health(model, student, teacher, embed)
    ratios = {k: v for k, v in health.items() if k.startswith("health/ratio/")}
    assert set(ratios) == {"health/ratio/main/standard-standard/embedding",
                           "health/ratio/main/standard-standard/last"}
    assert max(ratios.values()) <= 0.8, health
    assert health["health/spread/last"] < 0.9 and health["health/spread/embedding"] < 0.9, health
    for key in ratios:
        own, other = (health[key.replace("ratio", "own")], health[key.replace("ratio", "shuffled")])
        assert health[key] == pytest.approx(own / other)
    assert model.training  # the mode is restored


def test_health_shuffled_control_is_another_examples_teacher():
    student, teacher, embed = _synthetic_task(18, n=5)
    model = _gpt2(18)
    obj = CoT2AlignObjective(ObjectiveConfig(alpha=0.5, kd_base="none",
                                             ot=OTConfig(pairs={"main": 1.0}, layers=["last"])),
                             student_dim=D_S, teacher_dim=D_T)
    health = obj.health(model, student, teacher, embed)
    tb = teacher["standard"]
    rolled = TeacherBatch(**{**tb.__dict__, **{k: getattr(tb, k)[torch.arange(5).roll(-1)]
                                               for k in ("hidden", "mask", "input_ids",
                                                         "target_ids")}})
    model.eval()
    _, terms = obj(model, student, {"standard": rolled}, teacher_embed=embed)
    assert health["health/shuffled/main/standard-standard/last"] == pytest.approx(
        terms["ot/main/standard-standard/last"], rel=1e-5)
    assert obj.health(model, student, teacher, embed)  # repeatable
    assert CoT2AlignObjective(ObjectiveConfig(ot=None), student_dim=D_S,
                              teacher_dim=D_T).health(model, student, teacher, embed) == {}


@pytest.mark.parametrize("d_t", [48, 20])
def test_orthogonal_map_is_semi_orthogonal_without_bias_and_stays_so(d_t):
    """``ot.map: orthogonal``: W has orthonormal columns (D_t >= D_s: every angle between
    mapped states is kept, so they cannot be gathered onto one direction) or rows (a wider
    student: a projection), no bias, and it stays so through training."""
    gen = torch.Generator().manual_seed(31)
    ot_cfg = OTConfig(pairs={"main": 1.0}, layers=["last"], map="orthogonal")
    align = CoT2AlignObjective(ObjectiveConfig(alpha=1.0, kd_base="none", ot=ot_cfg),
                               student_dim=D_S, teacher_dim=d_t).ot
    (m,) = align.maps
    assert m.bias is None
    opt = torch.optim.AdamW(align.parameters(), lr=0.05)
    x = torch.randn(6, 5, D_S, generator=gen)
    target = torch.randn(6, 5, d_t, generator=gen)
    for _ in range(20):  # pull the map somewhere: it must stay semi-orthogonal
        loss = (m(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    W = m.weight.detach().double()
    eye = torch.eye(min(D_S, d_t), dtype=torch.float64)
    gram = W.T @ W if d_t >= D_S else W @ W.T
    assert torch.allclose(gram, eye, atol=1e-5)
    if d_t >= D_S:
        def cos(z):
            u = F.normalize(z.flatten(0, 1), dim=-1)
            return u @ u.T

        assert torch.allclose(cos(m(x).detach().double()), cos(x.double()), atol=1e-5)


def test_centred_cost_removes_the_batch_mean_of_each_side():
    """ot.center: each side minus the mean of its valid states over the batch, then the
    cosine cost; checked per example against those states, and a student side gathered on
    one point costs the same against every teacher."""
    model = _gpt2(23)
    student, teacher, embed, _ = _batch(23)
    cfg = ObjectiveConfig(alpha=1.0, kd_base="none",
                          ot=OTConfig(pairs={"main": 1.0}, layers=["last"], center=True))
    obj = CoT2AlignObjective(cfg, student_dim=D_S, teacher_dim=D_T)
    _, terms = obj(model, student, teacher, teacher_embed=embed)
    xs, ys = zip(*(_naive_states(obj, model, student, teacher, embed, "standard", "standard",
                                 "last", b) for b in range(4)))
    mx = torch.cat(xs).mean(0)
    my = torch.cat(ys).mean(0)
    vals = [ot_alignment_loss((x - mx)[None], (y - my)[None], max_iter=cfg.ot.max_iter).item()
            for x, y in zip(xs, ys)]
    assert terms["ot/main/standard-standard/last"] == pytest.approx(sum(vals) / 4, rel=1e-4)
    # Every student state the same: centred, the student side is 0 (up to rounding) and the
    # cost is about 1 for any teacher; uncentred, it is lower, and lowest for the teachers
    # nearest that point.
    with torch.no_grad():
        obj.ot.maps[0].weight.zero_()
        obj.ot.maps[0].bias.copy_(teacher["standard"].hidden[0, 0, 0].float())
    health = obj.health(model, student, teacher, embed)
    assert health["health/own/main/standard-standard/last"] == pytest.approx(1.0, abs=0.1)
    assert health["health/ratio/main/standard-standard/last"] == pytest.approx(1.0, abs=0.1)
    plain = CoT2AlignObjective(cfg.model_copy(update={"ot": cfg.ot.model_copy(
        update={"center": False})}), student_dim=D_S, teacher_dim=D_T)
    plain.load_state_dict(obj.state_dict())
    assert plain.health(model, student, teacher, embed)[
        "health/own/main/standard-standard/last"] < 0.9


def _rms(x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def _stiefel(g, rows, cols):
    """A random matrix with orthonormal columns (rows when wide), float64."""
    q, _ = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols), generator=g,
                                       dtype=torch.float64))
    return q if rows >= cols else q.T


@pytest.mark.parametrize("kind", ["linear", "orthogonal"])
@pytest.mark.parametrize("dims", [(16, 24), (24, 16), (20, 20)])
def test_anchor_init_is_the_procrustes_rotation(g, kind, dims):
    """``map_init: anchors`` puts the embedding map at the best orthonormal map of the anchor
    rows: it recovers a planted rotation, equals scipy's Procrustes (square case) and no
    nearby orthonormal map fits better; the map the objective then applies is that matrix."""
    scipy_linalg = pytest.importorskip("scipy.linalg")
    d_s, d_t = dims
    k = int(torch.randint(d_s + 2, 3 * d_s, (1,), generator=g))
    ot = OTAlignment(OTConfig(map=kind, map_init="anchors"), student_dim=d_s, teacher_dim=d_t)
    X = torch.randn(k, d_s, generator=g, dtype=torch.float64) * 3 + 1
    Q = _stiefel(g, d_t, d_s)
    # Planted: the teacher rows are the student's, rotated (RMS scale differs by sqrt(d_t/d_s)).
    Y = _rms(X) @ Q.T
    if d_t >= d_s:  # a tall map is determined by the anchors
        W = ot.init_from_anchors(X.float(), Y.float()).double()
        torch.testing.assert_close(W, Q, atol=1e-5, rtol=0)
    # With noise: the optimum over orthonormal maps, checked independently.
    Y = Y + 0.5 * torch.randn(k, d_t, generator=g, dtype=torch.float64)
    W = ot.init_from_anchors(X.float(), Y.float()).double()
    Xn, Yn = _rms(X), _rms(Y)
    gram = W.T @ W if d_t >= d_s else W @ W.T
    torch.testing.assert_close(gram, torch.eye(min(d_s, d_t), dtype=torch.float64), atol=1e-5,
                               rtol=0)

    def misfit(M):
        return float((Xn @ M.T - Yn).pow(2).sum())
    if d_s == d_t:
        R, _ = scipy_linalg.orthogonal_procrustes(Xn.numpy(), Yn.numpy())
        torch.testing.assert_close(W, torch.from_numpy(R).T, atol=1e-5, rtol=0)
    best = misfit(W)
    for _ in range(20):
        near = W + 0.05 * torch.randn(W.shape, generator=g, dtype=torch.float64)
        u, _, vh = torch.linalg.svd(near, full_matrices=False)
        assert misfit(u @ vh) >= best - 1e-6 * best
    # The objective's map now applies W (no bias) to RMS-normalised student states.
    layer = ot.maps[ot.names.index("embedding")]
    x = torch.randn(5, d_s, generator=g)
    torch.testing.assert_close(layer(_rms(x)), _rms(x) @ W.float().T, atol=1e-5, rtol=1e-5)
    if layer.bias is not None:
        assert float(layer.bias.detach().abs().max()) == 0.0
    # The orthogonal map keeps its parametrization (the stored matrix was set, not replaced).
    assert torch.nn.utils.parametrize.is_parametrized(layer, "weight") == (kind == "orthogonal")


def test_anchor_init_centres_with_center_and_needs_the_embedding_map(g):
    d_s, d_t, k = 8, 12, 30
    X = torch.randn(k, d_s, generator=g, dtype=torch.float64)
    Y = torch.randn(k, d_t, generator=g, dtype=torch.float64)
    ot = OTAlignment(OTConfig(map_init="anchors", center=True), student_dim=d_s,
                     teacher_dim=d_t)
    W = ot.init_from_anchors(X, Y).double()
    Xc, Yc = _rms(X) - _rms(X).mean(0), _rms(Y) - _rms(Y).mean(0)
    u, _, vh = torch.linalg.svd(Yc.T @ Xc, full_matrices=False)
    torch.testing.assert_close(W, u @ vh, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="pair up"):
        ot.init_from_anchors(X[:5], Y[:4])
    # A student derived from an anchored one may have no embedding map: the option is inert
    # there (the task checks), and the method refuses.
    for cfg in (OTConfig(map_init="anchors", layers=["last"]),
                OTConfig(map_init="anchors", space="student")):
        with pytest.raises(ValueError, match="embedding"):
            OTAlignment(cfg, student_dim=d_s, teacher_dim=d_t).init_from_anchors(X, Y)


def test_added_option_at_its_old_behaviour_keeps_the_fingerprint():
    from tasks.registry import ADDED_OPTIONS, _objective_params

    base = ObjectiveConfig()
    dumped = base.model_dump(mode="json")
    added = {path[-1] for path, _ in ADDED_OPTIONS}
    assert {"map", "center", "map_init"} <= added
    assert not added & set(_objective_params(base)["ot"])
    assert {k: v for k, v in dumped["ot"].items() if k not in added} == \
        _objective_params(base)["ot"]
    assert _objective_params(ObjectiveConfig(ot=OTConfig(map="orthogonal")))["ot"]["map"] == \
        "orthogonal"
    assert _objective_params(ObjectiveConfig(ot=OTConfig(center=True)))["ot"]["center"] is True
    assert _objective_params(ObjectiveConfig(ot=OTConfig(map_init="anchors")))["ot"][
        "map_init"] == "anchors"
    assert _objective_params(ObjectiveConfig(ot=None))["ot"] is None


# ------------------------------------------------------------------------------- errors
def test_errors():
    model = _gpt2()
    student, teacher, embed, head = _batch(10)
    with pytest.raises(ValueError, match="kd_base"):
        ObjectiveConfig(kd_base="kl")
    with pytest.raises(ValueError, match="pairs"):
        OTConfig(pairs={"cross_c": 1.0})
    with pytest.raises(ValueError, match="layers"):
        OTConfig(layers=["middle"])
    with pytest.raises(ValueError, match="layers"):
        OTConfig(layers=[])
    with pytest.raises(ValueError, match="twice"):
        OTConfig(layers=["last", "last"])
    with pytest.raises(ValueError, match="alpha"):
        ObjectiveConfig(alpha=1.5)
    with pytest.raises(ValueError, match="vocab_map"):
        CoT2AlignObjective(ObjectiveConfig(kd_base="mined"), student_dim=D_S, teacher_dim=D_T)
    with pytest.raises(ValueError, match="teacher_dim"):
        CoT2AlignObjective(ObjectiveConfig(kd_base="none"), student_dim=D_S)
    obj = CoT2AlignObjective(ObjectiveConfig(kd_base="none"), student_dim=D_S, teacher_dim=D_T)
    with pytest.raises(ValueError, match="teacher batches"):
        obj(model, student)
    bad = dict(teacher)
    bad["cot"] = TeacherBatch(**{**teacher["cot"].__dict__,
                                 "present": torch.ones(4, dtype=torch.bool)})
    with pytest.raises(ValueError, match="present"):
        obj(model, student, bad, teacher_embed=embed)
    with pytest.raises(ValueError, match="teacher_embed"):
        obj(model, student, teacher)
    with pytest.raises(ValueError, match="not an OT layer"):
        obj.transport_plan(model, student["cot"], teacher["cot"], layer="0.5",
                           teacher_embed=embed)
    with pytest.raises(ValueError, match="packed left"):
        TeacherBatch(**{**teacher["cot"].__dict__, "mask": teacher["cot"].mask.flip(1)})
    with pytest.raises(ValueError, match="input_ids"):
        TeacherBatch(**{**teacher["cot"].__dict__,
                        "input_ids": torch.zeros(4, 3, dtype=torch.long)})


def test_cross_pairs_use_their_own_layers():
    model = _gpt2(19)
    student, teacher, embed, _ = _batch(19)
    cfg = ObjectiveConfig(alpha=1.0, kd_base="none", ot=OTConfig(cross_layers=["last"]))
    obj = CoT2AlignObjective(cfg, student_dim=D_S, teacher_dim=D_T)
    _, terms = obj(model, student, teacher, teacher_embed=embed)
    ot_keys = {k for k in terms if k.startswith("ot/") and k.count("/") == 3}
    assert ot_keys == {"ot/main/standard-standard/embedding", "ot/main/standard-standard/last",
                       "ot/main/cot-cot/embedding", "ot/main/cot-cot/last",
                       "ot/cross_a/standard-cot/last", "ot/cross_b/cot-standard/last"}
    assert terms["ot"] == pytest.approx(sum(terms[k] for k in ot_keys), rel=1e-5)
    health = obj.health(model, student, teacher, embed)
    assert "health/ratio/cross_a/standard-cot/last" in health
    assert "health/ratio/cross_a/standard-cot/embedding" not in health
    assert OTConfig(layers=["last"]).cross_layers == ["last"]  # default: the main layers


# ------------------------------------------------------------------------------- one-sided OT
def _naive_one_sided(C, n, m, free, eps):
    """float64 loops: each kept-side token spreads its 1/len mass by a softmax of -C/eps."""
    total = 0.0
    if free == "teacher":
        for i in range(n):
            w = torch.softmax(-C[i, :m].double() / eps, 0)
            total += float((w * C[i, :m].double()).sum()) / n
    else:
        for j in range(m):
            w = torch.softmax(-C[:n, j].double() / eps, 0)
            total += float((w * C[:n, j].double()).sum()) / m
    return total


@pytest.mark.parametrize("free", ["teacher", "student"])
def test_one_sided_transport_matches_naive_reference(free):
    from cot2align_core.objective import one_sided_transport

    gen = torch.Generator().manual_seed(20)
    k, R_s, R_t = 5, 7, 4
    C = torch.rand(k, R_s, R_t, generator=gen) * 2
    n = torch.tensor([7, 3, 1, 5, 0])
    m = torch.tensor([4, 2, 4, 1, 3])
    sm = torch.arange(R_s)[None] < n[:, None]
    tm = torch.arange(R_t)[None] < m[:, None]
    C_pad = C.clone()
    C_pad[~(sm.unsqueeze(2) & tm.unsqueeze(1))] = float("nan")  # padding is never read
    got = one_sided_transport(C_pad, sm, tm, free=free, eps=0.1)
    for b in range(k):
        want = _naive_one_sided(C[b], int(n[b]), int(m[b]), free, 0.1) if n[b] and m[b] else 0.0
        assert float(got[b]) == pytest.approx(want, rel=1e-5, abs=1e-7)
    # Envelope gradient = the plan; "unroll" = the exact derivative (finite differences).
    Cg = C.clone().double().requires_grad_(True)
    one_sided_transport(Cg, sm, tm, free=free, eps=0.1, grad="envelope").sum().backward()
    plan = Cg.grad.clone()
    mass = plan.sum((1, 2))
    assert mass[n * m > 0].tolist() == pytest.approx([1.0] * int((n * m > 0).sum()))
    kept = plan.sum(2) if free == "teacher" else plan.sum(1)
    size = n if free == "teacher" else m
    for b in range(k):
        if n[b] and m[b]:
            assert kept[b, : size[b]].tolist() == pytest.approx([1 / float(size[b])] * int(size[b]))
    assert torch.autograd.gradcheck(
        lambda c: one_sided_transport(c, sm, tm, free=free, eps=0.1, grad="unroll"),
        (C.double().requires_grad_(True),))


def test_relaxed_cross_pairs_use_one_sided_transport():
    from cot2align_core.objective import one_sided_transport
    from cot2align_core.ot import pairwise_cost

    model = _gpt2(21)
    student, teacher, embed, _ = _batch(21)
    cfg = ObjectiveConfig(alpha=1.0, kd_base="none",
                          ot=OTConfig(cross_marginals="relaxed_cot", layers=["last"]))
    obj = CoT2AlignObjective(cfg, student_dim=D_S, teacher_dim=D_T)
    _, terms = obj(model, student, teacher, teacher_embed=embed)
    for pair, sf, tf, free in (("cross_a", "standard", "cot", "teacher"),
                               ("cross_b", "cot", "standard", "student")):
        vals = []
        for b in range(4):
            if student[sf].present[b] and teacher[tf].present[b]:
                x, y = _naive_states(obj, model, student, teacher, embed, sf, tf, "last", b)
                C = pairwise_cost(x[None], y[None])
                ones = lambda L: torch.ones(1, L, dtype=torch.bool)  # noqa: E731
                vals.append(float(one_sided_transport(C, ones(x.shape[0]), ones(y.shape[0]),
                                                      free=free, eps=0.05).detach()))
        assert terms[f"ot/{pair}/{sf}-{tf}/last"] == pytest.approx(sum(vals) / len(vals), rel=1e-4)
    # The main pairs stay balanced.
    x, y = _naive_states(obj, model, student, teacher, embed, "cot", "cot", "last", 0)
    x2, y2 = _naive_states(obj, model, student, teacher, embed, "cot", "cot", "last", 2)
    want = (ot_alignment_loss(x[None], y[None]) + ot_alignment_loss(x2[None], y2[None])) / 2
    assert terms["ot/main/cot-cot/last"] == pytest.approx(float(want.detach()), rel=1e-4)
