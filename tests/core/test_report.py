"""Figures and the markdown report: valid deterministic PNGs, readable labels, complete markdown."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cot2align_core.report import (
    DPI,
    display_token,
    loss_curves_figure,
    markdown_table,
    metric_bars_figure,
    plot_loss_curves,
    plot_metric_bars,
    plot_transport_plan,
    transport_plan_figure,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_png(path: Path, fig=None) -> tuple[int, int]:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        w, h = im.size
        assert "Software" not in im.info  # no version string: same bytes across versions
        assert not any("date" in k.lower() for k in im.info)
    if fig is not None:
        fw, fh = fig.get_size_inches()
        assert (w, h) == (round(fw * DPI), round(fh * DPI))
    return w, h


def _history(n=120, scale=1.0, nan_at=()):
    rng = np.random.default_rng(0)
    out = []
    for s in range(n):
        ce = scale * 3 * math.exp(-s / 40) + 0.5 + 0.05 * rng.standard_normal()
        out.append({"step": s, "loss": ce + 0.3, "ce": ce, "kd": 0.3,
                    "ot_main": 0.2, "ot_cross_a": 0.1, "ot_cross_b": 0.05 * math.exp(-s / 20),
                    "phase": "train"})
    for i in nan_at:
        out[i]["loss"] = float("nan")
    return out


RESULTS = {
    "teacher": {"rougeL": {"mean": 30.1, "std": 0.4, "n_seeds": 5},
                "exact_match": {"mean": 5.2, "std": 0.3, "n_seeds": 5}},
    "sft": {"rougeL": {"mean": 22.3, "std": 0.6, "n_seeds": 5},
            "exact_match": {"mean": 2.1, "std": 0.2, "n_seeds": 5}},
    "cot2align": {"rougeL": {"mean": 25.7, "std": 0.3, "n_seeds": 5},
                  "exact_match": {"mean": 3.4, "std": 0.1, "n_seeds": 5}},
}


# ---------------------------------------------------------------------------------------------
# loss curves


def test_loss_curves_png(tmp_path):
    hists = {"sft": _history(), "cot2align": _history(scale=1.3)}
    fig = loss_curves_figure(hists, ["ce", "kd", "ot_main", "ot_cross_a", "ot_cross_b"])
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ["loss", "ce", "kd", "ot_main", "ot_cross_a", "ot_cross_b"]
    legend_names = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend_names == ["sft", "cot2align"]
    # ot_cross_b spans > 30x and is positive: log scale chosen; the constant kd is linear
    scales = {ax.get_title(): ax.get_yscale() for ax in fig.axes}
    assert scales["ot_cross_b"] == "log" and scales["kd"] == "linear"
    out = plot_loss_curves(hists, tmp_path / "sub" / "loss.png", terms=["ce", "kd"])
    _check_png(out)


def test_loss_curves_nan_and_odd_histories(tmp_path):
    hists = {
        "nan run": _history(nan_at=(10, 50)),
        "short": [{"loss": 2.0}, {"loss": 1.5}],  # no "step": index used, too short to smooth
        "empty": [],
        "inf": [{"step": 0, "loss": float("inf")}, {"step": 1, "loss": None}],
    }
    fig = loss_curves_figure(hists, terms="all")
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles[0] == "loss" and "ce" in titles and "phase" not in titles
    notes = [t.get_text() for t in fig.axes[0].texts]
    assert any("4 non-finite" in t for t in notes)  # 2 NaN + inf + None
    _check_png(plot_loss_curves(hists, tmp_path / "loss.png"))
    with pytest.raises(ValueError):
        loss_curves_figure({})
    with pytest.raises(ValueError):
        loss_curves_figure(hists, terms="ce")


def test_loss_curve_panel_without_data_says_so():
    fig = loss_curves_figure({"a": [{"step": 0, "loss": 1.0}]}, ["kd"])
    assert any(t.get_text() == "no data" for t in fig.axes[1].texts)


# ---------------------------------------------------------------------------------------------
# metric bars


def test_metric_bars(tmp_path):
    fig = metric_bars_figure(RESULTS)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["rougeL", "exact_match"]
    assert len(ax.patches) == 6
    labels = {t.get_text() for t in ax.texts}
    assert {"30.1", "22.3", "25.7", "5.2", "2.1", "3.4"} <= labels
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["teacher", "sft", "cot2align"]
    assert "5 seeds" in ax.get_title()
    _check_png(plot_metric_bars(RESULTS, tmp_path / "bars.png"), fig)


def test_metric_bars_single_seed_and_missing_metric(tmp_path):
    results = {"only": {"rougeL": {"mean": 20.0, "std": float("nan"), "n_seeds": 1}},
               "other": {"rougeL": {"mean": 21.0, "std": None},
                         "exact_match": {"mean": 1.0, "std": 0.5}}}
    fig = metric_bars_figure(results)
    assert len(fig.axes[0].patches) == 3
    assert "1 seed\n" in fig.axes[0].get_title() and "undefined" in fig.axes[0].get_title()
    _check_png(plot_metric_bars(results, tmp_path / "bars.png"))
    with pytest.raises(ValueError):
        metric_bars_figure({})


# ---------------------------------------------------------------------------------------------
# transport plan


@pytest.mark.parametrize(
    "token, label",
    [
        ("hello", "hello"),
        (" world", "·world"),
        ("Ġworld", "·world"),
        ("▁world", "·world"),
        ("\n", "⏎"),
        ("Ċ", "⏎"),
        ("<0x0A>", "⏎"),
        ("a\tb", "a⇥b"),
        ("", "∅"),
        ("$5", "$5"),
        ("日", "\\u65e5"),  # not in the default font: escaped rather than drawn as a box
        ("\x00", "\\u0000"),
        ("abcdefghijklmnopqrstuvwxyz", "abcdefghijk…"),
    ],
)
def test_display_token(token, label):
    assert display_token(token) == label


def test_display_token_markers_can_be_kept():
    assert display_token("Ġé", byte_level_markers=False) == "Ġé"


def test_transport_plan_labels_are_the_tokens(tmp_path):
    student = ["The", "Ġquick", "Ġfox", "Ċ", "$x$"]
    teacher = ["▁The", "▁qu", "ick", "▁fox", "<0x0A>", "▁$", "x", "$"]
    plan = np.random.default_rng(0).random((5, 8))
    plan /= plan.sum()
    fig = transport_plan_figure(plan, student, teacher, title="demo")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["The", "·quick", "·fox", "⏎", "$x$"]
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        "·The", "·qu", "ick", "·fox", "⏎", "·$", "x", "$"]
    assert not any(t.get_parse_math() for t in ax.get_yticklabels())  # "$x$" is not a formula
    assert ax.get_title() == "demo"
    assert len(fig.axes) == 2  # heatmap + colorbar
    out = plot_transport_plan(plan, student, teacher, tmp_path / "plan.png", title="demo")
    _check_png(out, fig)


def test_transport_plan_one_token_and_tensor_input(tmp_path):
    torch = pytest.importorskip("torch")
    plan = torch.ones(1, 1, dtype=torch.bfloat16, requires_grad=True)
    fig = transport_plan_figure(plan, ["a"], ["b"])
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["b"]
    _check_png(plot_transport_plan(plan, ["a"], ["b"], tmp_path / "one.png"))


def test_transport_plan_long_sequences(tmp_path):
    n, m = 300, 400
    plan = np.full((n, m), 1.0 / (n * m))
    plan[5, 7] = np.nan  # drawn blank, not an error
    student = [f"s{i}" for i in range(n)]
    teacher = [f"t{i}" for i in range(m)]
    fig = transport_plan_figure(plan, student, teacher)
    ax = fig.axes[0]
    xl = [t.get_text() for t in ax.get_xticklabels()]
    yl = [t.get_text() for t in ax.get_yticklabels()]
    # labels thinned to what fits, each carrying its position; every cell still drawn
    assert 20 < len(xl) < m and 20 < len(yl) < n
    assert xl[0] == "0:t0" and all(lab.split(":", 1)[1] == f"t{lab.split(':')[0]}" for lab in xl)
    assert ax.images[0].get_array().shape == (n, m)
    assert "labelled every" in ax.get_xlabel()
    w, h = fig.get_size_inches()
    assert w <= 20 and h <= 20  # the figure grows with the sequence, up to a cap
    w_px, h_px = _check_png(plot_transport_plan(plan, student, teacher, tmp_path / "big.png"))
    assert w_px >= 1000 and h_px >= 1000


def test_transport_plan_shape_mismatch():
    with pytest.raises(ValueError, match="rows = student"):
        transport_plan_figure(np.ones((2, 3)), ["a", "b", "c"], ["x", "y"])
    with pytest.raises(ValueError, match="2-D"):
        transport_plan_figure(np.ones(3), ["a", "b", "c"], ["x"])


def test_pngs_are_deterministic(tmp_path):
    plan = np.eye(3) / 3
    a = plot_transport_plan(plan, list("abc"), list("xyz"), tmp_path / "a.png")
    b = plot_transport_plan(plan, list("abc"), list("xyz"), tmp_path / "b.png")
    assert a.read_bytes() == b.read_bytes()
    a = plot_metric_bars(RESULTS, tmp_path / "c.png")
    b = plot_metric_bars(RESULTS, tmp_path / "d.png")
    assert a.read_bytes() == b.read_bytes()


def test_no_pyplot_figures_left_open(tmp_path):
    import sys

    plot_metric_bars(RESULTS, tmp_path / "x.png")
    plot_loss_curves({"a": _history(20)}, tmp_path / "y.png")
    if "matplotlib.pyplot" in sys.modules:  # only when something else imported pyplot
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []


# ---------------------------------------------------------------------------------------------
# markdown


def test_markdown_table():
    rows = [{"name": "a|b", "score": 1.23456, "n": 3, "note": "two\nlines"},
            {"name": "c", "score": float("nan"), "n": None}]
    text = markdown_table(rows)
    lines = text.splitlines()
    assert lines[0] == "| name | score | n | note |"
    assert lines[1] == "|---|---:|---:|---|"
    assert lines[2] == "| a\\|b | 1.23 | 3 | two<br>lines |"
    assert lines[3] == "| c | n/a | n/a | n/a |"
    assert markdown_table(rows, ["n"], headers={"n": "seeds"}).splitlines()[0] == "| seeds |"
    assert markdown_table([], ["x"]) == "| x |\n|---|"
    assert markdown_table([{"x": "1 ± 2"}], right=["x"]).splitlines()[1] == "|---:|"
    with pytest.raises(ValueError):
        markdown_table([])


def _report_inputs(tmp_path):
    figs = tmp_path / "out" / "figures"
    loss = plot_loss_curves({"a": _history(30)}, figs / "loss curves.png")
    bars = plot_metric_bars(RESULTS, figs / "bars.png")
    metrics_table = [
        {"model": model, "metric": metric, **stats}
        for model, per in RESULTS.items() for metric, stats in per.items()
    ] + [{"model": "one seed", "metric": "rougeL", "mean": 19.0, "std": float("nan"),
          "n_seeds": 1}]
    return dict(
        title="CoT2Align demo",
        config_summary={"student": "gpt2", "train": {"lr": 5e-4, "alpha": 0.5},
                        "seeds": [0, 1, 2, 3, 4]},
        metrics_table=metrics_table,
        stage_summaries={
            "generate": {"artifact": "/store/generate/0123456789abcdef0123", "fingerprint":
                         "0123456789abcdef0123", "seconds": 754.2, "rows": 1000},
            "distill": {"artifact": "/store/distill/feed", "fingerprint": "feedbeef",
                        "seconds": 12.5, "counts": {"steps": 300, "epochs": 2}},
        },
        images={"Training loss": loss, "Metrics": bars,
                "Missing plan": tmp_path / "nowhere.png"},
        samples=[
            {"id": "dolly-7", "prompt": "Name a color.", "reference": "Blue.",
             "predictions": {"sft": "Red", "cot2align": "Blue ```code``` here"}},
            {"prompt": "Long one", "reference": "x" * 5000, "teacher": "y"},
        ],
    )


def test_write_report(tmp_path):
    inputs = _report_inputs(tmp_path)
    path = write_report(tmp_path / "out", **inputs)
    assert path == tmp_path / "out" / "report.md"
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# CoT2Align demo\n")
    # metrics: one row per model, one column per metric, mean ± sample std
    assert "| model | rougeL | exact_match | seeds |\n|---|---:|---:|---:|" in text
    assert "| teacher | 30.10 ± 0.40 | 5.20 ± 0.30 | 5 |" in text
    assert "| cot2align | 25.70 ± 0.30 | 3.40 ± 0.10 | 5 |" in text
    assert "| one seed | 19.00 ± n/a | n/a | 1 |" in text
    # images by path relative to the report, spaces encoded
    assert "![Training loss](figures/loss%20curves.png)" in text
    assert "![Metrics](figures/bars.png)" in text
    assert "image not found" in text and "nowhere.png" in text
    # stages
    # stages: one row each, its own figures in one cell (no wide table of empty cells)
    assert "| stage | fingerprint | seconds | figures |" in text
    assert ("| generate | `0123456789ab` | 12 min 34 s | "
            "artifact=`/store/generate/0123456789abcdef0123`, rows=1000 |") in text
    assert "counts: steps=300, epochs=2" in text
    # configuration flattened
    assert "| train.lr | 0.0005 |" in text and "| seeds | [0, 1, 2, 3, 4] |" in text
    # samples: the fence outgrows backticks inside; long texts cut with their length noted
    assert "### Sample 1 (`dolly-7`)" in text
    assert "**cot2align**\n\n````text\nBlue ```code``` here\n````" in text
    assert "**teacher**" in text
    assert "truncated: 5,000 characters in all" in text
    assert not list((tmp_path / "out").glob(".*tmp"))
    # deterministic
    again = write_report(tmp_path / "out", **inputs).read_text(encoding="utf-8")
    assert again == text


def test_write_report_empty_sections(tmp_path):
    path = write_report(tmp_path / "r", title="t", config_summary={}, metrics_table=[],
                        stage_summaries={}, images={}, samples=[])
    text = path.read_text(encoding="utf-8")
    assert "_No metrics._" in text and "_No samples._" in text and "## Figures" not in text


def test_transport_plan_colours_are_relative_to_the_uniform_plan():
    """A uniform plan is one flat colour (the middle of a fixed scale), not rescaled into
    apparent structure; a sharp plan reaches the top of the same scale."""
    import numpy as np

    n, m = 5, 7
    uniform = np.full((n, m), 1.0 / (n * m))
    uniform[0, 0] *= 1.02  # tiny noise must not become contrast
    fig = transport_plan_figure(uniform, list("abcde"), list("ABCDEFG"))
    image = fig.axes[0].images[0]
    values = image.norm(image.get_array())
    assert float(values.max() - values.min()) < 0.01
    assert abs(float(values.mean()) - 0.5) < 0.01  # 1x uniform sits mid-scale
    assert "uniform" in fig.axes[1].get_ylabel()
    sharp = np.zeros((n, m))
    sharp[np.arange(n), np.arange(n)] = 1.0 / n
    image = transport_plan_figure(sharp, list("abcde"), list("ABCDEFG")).axes[0].images[0]
    assert float(image.norm(image.get_array()).max()) > 0.9


def test_the_paper_table_has_one_column_per_form_decoding_and_metric(tmp_path):
    rows = []
    for model, base in (("cot2align", 70.0), ("sft", 60.0)):
        for form in ("standard", "cot"):
            for dec in ("greedy", "sampled"):
                for metric in ("exact_match", "rougeL"):
                    rows.append(dict(model=model, form=form, decoding=dec, metric=metric,
                                     mean=base, std=1.0, n_seeds=3))
    diffs = [dict(model="cot2align", reference="sft", form="standard", decoding="greedy",
                  metric=m, diff=10.0, low=4.0, high=16.0, n_seeds=3, n_rows=100)
             for m in ("exact_match", "rougeL")]
    path = write_report(tmp_path, title="t", config_summary={}, metrics_table=rows,
                        stage_summaries={}, images={}, samples=[], differences=diffs)
    text = path.read_text()
    # rougeL equals exact match on every row: shown once, and said so.
    assert "| model | standard greedy exact_match | standard sampled exact_match |" in text
    assert "standard greedy rougeL" not in text and "rougeL equals another metric" in text
    assert "| cot2align | 70.00 ± 1.00 |" in text and "| 3 |" in text
    assert "## Paired differences" in text and "[+4.00, +16.00] *" in text


def test_differences_figure_marks_intervals_that_exclude_zero(tmp_path):
    from cot2align_core.report import differences_figure, plot_differences

    diffs = [dict(model="a", reference="sft", form="standard", decoding="greedy",
                  metric="exact_match", diff=d, low=lo, high=hi, n_seeds=3, n_rows=50)
             for d, lo, hi in ((5.0, 1.0, 9.0), (-1.0, -4.0, 2.0))]
    fig = differences_figure(diffs)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == ["a - sft | standard greedy exact_match"] * 2
    _check_png(plot_differences(diffs, tmp_path / "d.png"))
