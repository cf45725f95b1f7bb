"""Figures (PNG) and a markdown report, from plain data.

Everything here takes dicts, lists and arrays and writes files; it knows nothing of Prefect or
of the artifact layout (the evaluate stage gathers the data and picks the paths).

Figures are built with :class:`matplotlib.figure.Figure` and an Agg canvas directly, never
through ``pyplot``: no global backend is switched and no figure is registered in pyplot's
figure manager, so nothing has to be closed and other users of matplotlib in the same process
are unaffected. Each ``*_figure`` function returns the Figure (to inspect or show in a notebook),
each ``plot_*`` function builds, saves and returns the PNG path. Output is deterministic: fixed
size and dpi, no "Software"/date entries in the PNG metadata, the same bytes for the same input.

User text shown in figures (tokens, run and model names) is drawn with mathtext off, so a "$"
in a token is a dollar sign, not the start of a formula.
"""
from __future__ import annotations

import functools
import json
import math
import os
import unicodedata
import urllib.parse
from collections.abc import Mapping, Sequence
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "DPI",
    "loss_curves_figure",
    "plot_loss_curves",
    "metric_bars_figure",
    "plot_metric_bars",
    "display_token",
    "transport_plan_figure",
    "plot_transport_plan",
    "save_figure",
    "markdown_table",
    "write_report",
]

DPI = 100
_PNG_METADATA = {"Software": None}  # no matplotlib version string: same bytes across versions


# --------------------------------------------------------------------------------------------
# figure plumbing


def _new_figure(width_in: float, height_in: float) -> Figure:
    fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, out_png: str | os.PathLike) -> Path:
    """Write ``fig`` as a PNG (fixed dpi, no metadata that changes between runs), atomically."""
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, format="png", dpi=DPI, metadata=_PNG_METADATA)
    os.replace(tmp, out)
    return out


def _is_missing(x: Any) -> bool:
    return x is None or (isinstance(x, Real) and not isinstance(x, bool) and math.isnan(x))


def _to_float(x: Any) -> float:
    """A finite or non-finite float, NaN for None / non-numbers (tensors and numpy scalars ok)."""
    if x is None or isinstance(x, bool):
        return float("nan")
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _plain_texts(legend) -> None:
    """Legend entries are names, not formulas: a "$" in a name stays a dollar sign."""
    for t in legend.get_texts():
        t.set_parse_math(False)


# --------------------------------------------------------------------------------------------
# loss curves


def _ema(values: np.ndarray, smoothing: float) -> np.ndarray:
    """Debiased exponential moving average over the finite entries (as TensorBoard's slider);
    non-finite entries stay NaN in the output and do not enter the average."""
    out = np.full_like(values, np.nan, dtype=np.float64)
    acc, weight = 0.0, 0.0
    for i, v in enumerate(values):
        if not math.isfinite(v):
            continue
        acc = smoothing * acc + (1.0 - smoothing) * v
        weight = smoothing * weight + (1.0 - smoothing)
        out[i] = acc / weight
    return out


def _series(history: Sequence[Mapping], key: str, step_key: str) -> tuple[np.ndarray, np.ndarray]:
    steps, values = [], []
    for i, rec in enumerate(history):
        if key not in rec:
            continue
        step = rec.get(step_key, i)
        steps.append(_to_float(step) if step is not None else float(i))
        values.append(_to_float(rec[key]))
    return np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)


def _numeric_keys(histories: Mapping[str, Sequence[Mapping]], exclude: set[str]) -> list[str]:
    keys: dict[str, None] = {}
    for hist in histories.values():
        for rec in hist:
            for k, v in rec.items():
                if k in exclude or k in keys or isinstance(v, bool):
                    continue
                if v is None or isinstance(v, (Real, np.number)) or hasattr(v, "item"):
                    keys[k] = None
    return list(keys)


def loss_curves_figure(
    histories: Mapping[str, Sequence[Mapping[str, Any]]],
    terms: Sequence[str] | str | None = None,
    *,
    loss_key: str = "loss",
    step_key: str = "step",
    smoothing: float = 0.6,
    log_y: bool | None = None,
    title: str | None = None,
) -> Figure:
    """Loss vs step for each run, one panel for the total loss and one per requested term.

    Args:
        histories: ``{run name: [{"step": 0, "loss": 2.3, "ce": ..., "kd": ..., ...}, ...]}``.
            A record without ``step_key`` takes its index as step; a missing key skips that
            point; ``None``/NaN/inf values leave a gap, are marked with an "x" on the x axis
            and counted in a note in the panel's corner.
        terms: extra panels: a list of keys (``["ce", "kd", "ot_main", "ot_cross_a",
            "ot_cross_b"]``), ``"all"`` for every numeric key other than the step and the
            loss (learning rate or grad norm included, if logged), or ``None`` for the total
            loss only.
        smoothing: debiased EMA weight in [0, 1) for the solid line; the raw values are drawn
            faintly behind it. 0 = no smoothing. Runs with fewer than 10 points are not smoothed.
        log_y: log scale on y; ``None`` chooses per panel: on when every finite value is > 0 and
            they span more than a factor 30.
    """
    if not histories:
        raise ValueError("no runs to plot")
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    if terms is None:
        extra: list[str] = []
    elif isinstance(terms, str):
        if terms != "all":
            raise ValueError(f"terms must be a list of keys, 'all' or None, got {terms!r}")
        extra = _numeric_keys(histories, exclude={step_key, loss_key})
    else:
        extra = [t for t in terms if t != loss_key]
    panels = [loss_key, *extra]

    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = _new_figure(5.0 * ncols + 1.5, 3.4 * nrows + 0.4)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colors = _colors(len(histories))

    for ax, key in zip(axes, panels):
        finite_all, n_bad_panel = [], 0
        for color, (run, hist) in zip(colors, histories.items()):
            steps, values = _series(hist, key, step_key)
            if len(values) == 0:
                continue
            finite = np.isfinite(values)
            finite_all.append(values[finite])
            n_bad = int((~finite).sum())
            n_bad_panel += n_bad
            if smoothing > 0 and finite.sum() >= 10:
                ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
                smooth = _ema(values, smoothing)
                ok = np.isfinite(smooth)
                ax.plot(steps[ok], smooth[ok], color=color, linewidth=1.6, label=run)
            else:
                ax.plot(steps, values, color=color, linewidth=1.4, marker="o", markersize=3,
                        label=run)
            if n_bad:  # where the run produced NaN/inf: an "x" on the x axis
                ax.plot(steps[~finite], np.full(n_bad, 0.02), linestyle="none", marker="x",
                        color=color, markersize=6, transform=ax.get_xaxis_transform(),
                        clip_on=False)
        if n_bad_panel:
            ax.text(0.99, 0.98, f"x: {n_bad_panel} non-finite value(s)", transform=ax.transAxes,
                    ha="right", va="top", fontsize=8, color="firebrick")
        if len(panels) > 1:
            ax.set_title(key, parse_math=False)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        vals = np.concatenate(finite_all) if finite_all else np.empty(0)
        if vals.size == 0:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes,
                    color="gray")
            continue
        use_log = log_y
        if use_log is None:
            use_log = bool(vals.min() > 0 and vals.max() / vals.min() > 30)
        if use_log and vals.min() > 0:
            ax.set_yscale("log")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    axes[0].set_ylabel(loss_key, parse_math=False)
    handles, labels = [], []
    for ax in axes[: len(panels)]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        _plain_texts(fig.legend(handles, labels, loc="outside right upper", fontsize=9))
    fig.suptitle(title or ("Training loss" if len(panels) == 1 else "Training loss and its terms"),
                 parse_math=False)
    return fig


def plot_loss_curves(
    histories: Mapping[str, Sequence[Mapping[str, Any]]],
    out_png: str | os.PathLike,
    terms: Sequence[str] | str | None = None,
    **kwargs,
) -> Path:
    """Save :func:`loss_curves_figure` as a PNG and return its path."""
    return save_figure(loss_curves_figure(histories, terms, **kwargs), out_png)


# --------------------------------------------------------------------------------------------
# metric bars


def metric_bars_figure(
    results: Mapping[str, Mapping[str, Mapping[str, Any]]],
    *,
    title: str | None = None,
    ylabel: str = "score (x100)",
    value_fmt: str = "{:.1f}",
) -> Figure:
    """Grouped bars: one group per metric, one bar per model, error bars = std over seeds.

    Args:
        results: ``{model: {metric: {"mean": float, "std": float, "n_seeds": int?}}}`` (the
            output of :func:`cot2align_core.metrics.summarize` per model fits). A metric absent
            for a model leaves a gap; a ``std`` that is None/NaN (single seed) draws no error
            bar. The mean is written above each bar.
    """
    if not results:
        raise ValueError("no models to plot")
    models = list(results)
    metrics: list[str] = []
    for per_model in results.values():
        metrics.extend(m for m in per_model if m not in metrics)
    if not metrics:
        raise ValueError("no metrics to plot")

    n_models, n_metrics = len(models), len(metrics)
    group_in = 0.45 * n_models + 0.6  # inches per metric group
    fig = _new_figure(max(6.0, n_metrics * group_in + 2.8), 4.2)
    ax = fig.add_subplot()
    width = 0.8 / n_models
    x = np.arange(n_metrics, dtype=np.float64)
    colors = _colors(n_models)
    tops, bottoms, n_seeds, missing_std = [0.0], [0.0], set(), False
    for j, (model, color) in enumerate(zip(models, colors)):
        means = np.array([_to_float(results[model].get(m, {}).get("mean")) for m in metrics])
        stds = np.array([_to_float(results[model].get(m, {}).get("std")) for m in metrics])
        for m in metrics:
            n = results[model].get(m, {}).get("n_seeds")
            if n is not None:
                n_seeds.add(int(n))
        xs = x - 0.4 + width * (j + 0.5)
        ok = np.isfinite(means)
        if not ok.any():
            continue
        missing_std |= bool((~np.isfinite(stds[ok])).any())
        yerr = stds[ok]
        ax.bar(xs[ok], means[ok], width * 0.92, color=color, label=model, yerr=yerr,
               capsize=3, error_kw={"elinewidth": 1.0, "ecolor": "black"})
        for xi, mean, std in zip(xs[ok], means[ok], stds[ok]):
            spread = std if math.isfinite(std) else 0.0
            top = mean + spread if mean >= 0 else mean - spread
            tops.append(top)
            bottoms.append(min(0.0, top))
            ax.annotate(value_fmt.format(mean), (xi, top), xytext=(0, 2 if mean >= 0 else -2),
                        textcoords="offset points", ha="center",
                        va="bottom" if mean >= 0 else "top", fontsize=8)
    hi, lo = max(tops), min(bottoms)
    span = (hi - lo) or 1.0
    ax.set_ylim(lo - (0.1 * span if lo < 0 else 0.0), hi + 0.12 * span)
    ax.set_xticks(x, metrics, parse_math=False)
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    _plain_texts(fig.legend(loc="outside right upper", fontsize=9))
    if len(n_seeds) == 1:
        n = n_seeds.pop()
        seeds = f"{n} seed" + ("s" if n != 1 else "")
    elif n_seeds:
        seeds = f"{min(n_seeds)}-{max(n_seeds)} seeds"
    else:
        seeds = "seeds"
    note = f"error bars: ±1 sample std over {seeds}"
    if missing_std:
        note += "\n(no error bar where the std is undefined: one seed)"
    ax.set_title(note, fontsize=9, color="dimgray")
    fig.suptitle(title or "Evaluation metrics (mean over seeds)", parse_math=False)
    return fig


def differences_figure(differences: Sequence[Mapping[str, Any]], *,
                       title: str | None = None) -> Figure:
    """Forest plot of paired differences: one row per (model vs reference, form, decoding,
    metric), a dot at the difference and a bar over its 95% interval, a line at 0."""
    if not differences:
        raise ValueError("no differences to plot")
    drop = redundant_metrics([{**d, "mean": d["diff"], "std": d["low"]} for d in differences])
    rows = [d for d in differences if d["metric"] not in drop]
    labels = [f"{d['model']} - {d['reference']} | {d['form']} {d['decoding']} {d['metric']}"
              for d in rows]
    fig = _new_figure(9.0, 0.32 * len(rows) + 1.4)
    ax = fig.add_subplot()
    y = np.arange(len(rows))[::-1]
    diff = np.array([d["diff"] for d in rows])
    lo = np.array([d["low"] for d in rows])
    hi = np.array([d["high"] for d in rows])
    colors = ["tab:green" if l > 0 else "tab:red" if h < 0 else "tab:gray" for l, h in zip(lo, hi)]
    ax.hlines(y, lo, hi, colors=colors, linewidth=2)
    ax.scatter(diff, y, color=colors, zorder=3, s=18)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(y, labels, fontsize=7, parse_math=False)
    ax.set_xlabel("difference (score x100); bar: 95% bootstrap interval")
    ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(title or "Paired differences against the references", parse_math=False)
    return fig


def plot_differences(differences: Sequence[Mapping[str, Any]], out_png: str | os.PathLike,
                     **kwargs) -> Path:
    """Save :func:`differences_figure` as a PNG and return its path."""
    return save_figure(differences_figure(differences, **kwargs), out_png)


def plot_metric_bars(
    results: Mapping[str, Mapping[str, Mapping[str, Any]]], out_png: str | os.PathLike, **kwargs
) -> Path:
    """Save :func:`metric_bars_figure` as a PNG and return its path."""
    return save_figure(metric_bars_figure(results, **kwargs), out_png)


# --------------------------------------------------------------------------------------------
# transport plan heatmap

# Whitespace made visible, and the tokenizers' own markers for it (GPT-2 byte level: "Ġ" space,
# "Ċ" newline, "ĉ" tab; SentencePiece: "▁" space, byte fallback "<0x0A>").
_VISIBLE = {" ": "·", "\n": "⏎", "\t": "⇥", "\r": "\\r"}
_MARKERS = {"Ġ": " ", "Ċ": "\n", "ĉ": "\t", "▁": " ", "<0x0A>": "\n", "<0x09>": "\t",
            "<0x20>": " ", "<0x0D>": "\r"}


@functools.cache
def _font_charmap() -> frozenset[int] | None:
    """Code points the default font can draw (None: unknown, assume all)."""
    try:
        from matplotlib import font_manager
        from matplotlib.ft2font import FT2Font

        path = font_manager.findfont(font_manager.FontProperties(), fallback_to_default=True)
        return frozenset(FT2Font(path).get_charmap())
    except Exception:  # pragma: no cover - font lookup is best effort
        return None


def display_token(token: str, max_chars: int = 12, byte_level_markers: bool = True) -> str:
    """A token as a readable one-line label.

    Spaces -> "·", newlines -> "⏎", tabs -> "⇥"; with ``byte_level_markers`` the tokenizers'
    markers for them ("Ġ", "Ċ", "ĉ", "▁", "<0x0A>") are shown the same way. Control characters
    and characters the font cannot draw (e.g. CJK in DejaVu Sans) become ``\\uXXXX`` escapes;
    the empty token is "∅"; labels longer than ``max_chars`` end with "…".
    """
    if token == "":
        return "∅"
    text = token
    if byte_level_markers:
        if text in _MARKERS:
            text = _MARKERS[text]
        else:
            for marker in ("Ġ", "Ċ", "ĉ", "▁"):
                text = text.replace(marker, _MARKERS[marker])
    charmap = _font_charmap()
    pieces = []
    for ch in text:
        if ch in _VISIBLE:
            pieces.append(_VISIBLE[ch])
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn") or (
            charmap is not None and ord(ch) not in charmap
        ):
            pieces.append(f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}")
        else:
            pieces.append(ch)
    label = "".join(pieces)
    if len(label) > max_chars:
        label = label[: max(1, max_chars - 1)] + "…"
    return label


def _as_2d_array(plan: Any) -> np.ndarray:
    if hasattr(plan, "detach"):  # torch tensor (any dtype, e.g. bf16, any device)
        plan = plan.detach().to("cpu").float().numpy()
    arr = np.asarray(plan, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"transport plan must be 2-D [n_student, n_teacher], got {arr.shape}")
    return arr


_REL_MIN, _REL_MAX = 0.1, 10.0  # colour range of the plan, relative to the uniform plan
_LABEL_PITCH_IN = 0.14  # inches per tick label at fontsize 7: denser labels overlap
_CELL_IN = 0.16  # inches per token while the figure grows with the sequence
_MAX_AXIS_IN = 13.0


def _tick_plan(n: int, axis_in: float) -> tuple[np.ndarray, bool]:
    capacity = max(1, int(axis_in / _LABEL_PITCH_IN))
    step = max(1, math.ceil(n / capacity))
    return np.arange(0, n, step), step > 1


def transport_plan_figure(
    plan: Any,
    student_tokens: Sequence[str],
    teacher_tokens: Sequence[str],
    *,
    title: str | None = None,
    max_label_chars: int = 12,
    byte_level_markers: bool = True,
    cmap: str = "viridis",
) -> Figure:
    """Heatmap of an OT plan ``T [n, m]``: rows = student tokens (y), columns = teacher (x).

    The figure grows with the sequence lengths (0.16 in per token) up to 13 in per axis; past
    what fits, every k-th token is labelled as ``"i:token"`` (the heatmap keeps every cell).
    Colours show each cell's mass relative to the uniform plan, :math:`n m T_{ij}` (1 = the
    mass every cell has in the uniform plan ``a b^T``), on a fixed logarithmic scale from 1/10
    to 10x uniform: a plan that is nearly uniform looks flat, not rescaled into structure.
    NaN cells are drawn blank.
    """
    arr = _as_2d_array(plan)
    n, m = arr.shape
    if n != len(student_tokens) or m != len(teacher_tokens):
        raise ValueError(
            f"plan is {n}x{m} but there are {len(student_tokens)} student and "
            f"{len(teacher_tokens)} teacher tokens (rows = student, columns = teacher)"
        )
    if n == 0 or m == 0:
        raise ValueError("cannot draw a transport plan with an empty sequence")

    label_margin = 0.075 * max_label_chars + 0.5  # room for rotated/horizontal labels
    w_axis = min(_MAX_AXIS_IN, max(2.5, m * _CELL_IN))
    h_axis = min(_MAX_AXIS_IN, max(2.0, n * _CELL_IN))
    fig = _new_figure(w_axis + label_margin + 1.6, h_axis + label_margin + 0.9)
    ax = fig.add_subplot()
    from matplotlib.colors import LogNorm

    with np.errstate(invalid="ignore"):
        relative = np.where(np.isfinite(arr), np.maximum(arr * (n * m), _REL_MIN), np.nan)
    image = ax.imshow(np.ma.masked_invalid(relative), aspect="auto", interpolation="nearest",
                      cmap=cmap, norm=LogNorm(vmin=_REL_MIN, vmax=_REL_MAX, clip=True))
    cbar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
    cbar.set_label("mass / uniform mass (n m T_ij; 1 = uniform plan)", parse_math=False)

    def labels(tokens, idx, indexed):
        out = [display_token(tokens[i], max_label_chars, byte_level_markers) for i in idx]
        return [f"{i}:{t}" for i, t in zip(idx, out)] if indexed else out

    xi, x_sub = _tick_plan(m, w_axis)
    yi, y_sub = _tick_plan(n, h_axis)
    fontsize = 8 if max(len(xi), len(yi)) <= 40 else 7
    ax.set_xticks(xi, labels(teacher_tokens, xi, x_sub), rotation=90, fontsize=fontsize,
                  parse_math=False)
    ax.set_yticks(yi, labels(student_tokens, yi, y_sub), fontsize=fontsize, parse_math=False)
    ax.tick_params(length=2)
    x_note = f" ({m}, labelled every {xi[1] - xi[0]})" if x_sub else f" ({m})"
    y_note = f" ({n}, labelled every {yi[1] - yi[0]})" if y_sub else f" ({n})"
    ax.set_xlabel("teacher tokens" + x_note)
    ax.set_ylabel("student tokens" + y_note)
    ax.set_title(title or "OT transport plan: student x teacher", parse_math=False)
    return fig


def plot_transport_plan(
    plan: Any,
    student_tokens: Sequence[str],
    teacher_tokens: Sequence[str],
    out_png: str | os.PathLike,
    title: str | None = None,
    **kwargs,
) -> Path:
    """Save :func:`transport_plan_figure` as a PNG and return its path."""
    fig = transport_plan_figure(plan, student_tokens, teacher_tokens, title=title, **kwargs)
    return save_figure(fig, out_png)


# --------------------------------------------------------------------------------------------
# markdown


def _cell(value: Any, floatfmt: str) -> str:
    if _is_missing(value):
        text = "n/a"
    elif isinstance(value, bool):
        text = str(value)
    elif isinstance(value, float) or isinstance(value, np.floating):
        text = format(float(value), floatfmt)
    elif isinstance(value, (Mapping, list, tuple)):
        text = json.dumps(value, ensure_ascii=False, default=str, sort_keys=False)
    else:
        text = str(value)
    text = text.replace("|", "\\|")
    return text.replace("\r\n", "\n").replace("\n", "<br>").strip()


def markdown_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    *,
    headers: Mapping[str, str] | None = None,
    floatfmt: str = ".2f",
    right: Sequence[str] = (),
) -> str:
    """A GitHub-flavoured markdown table.

    ``columns`` defaults to every key in order of first appearance; ``headers`` renames
    columns. Floats use ``floatfmt``; None/NaN show "n/a"; "|" and newlines are escaped;
    columns whose values are all numbers, and those named in ``right``, are right-aligned.
    Ends without a newline.
    """
    if columns is None:
        seen: dict[str, None] = {}
        for r in rows:
            seen.update(dict.fromkeys(r))
        columns = list(seen)
    if not columns:
        raise ValueError("a table needs at least one column")
    headers = headers or {}
    numeric = []
    for c in columns:
        vals = [r.get(c) for r in rows if not _is_missing(r.get(c))]
        numeric.append(c in right or (bool(vals) and all(
            isinstance(v, (Real, np.number)) and not isinstance(v, bool) for v in vals)))
    lines = [
        "| " + " | ".join(_cell(headers.get(c, c), floatfmt) for c in columns) + " |",
        "|" + "|".join("---:" if num else "---" for num in numeric) + "|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c), floatfmt) for c in columns) + " |")
    return "\n".join(lines)


def _fmt_seconds(s: Any) -> str:
    s = _to_float(s)
    if not math.isfinite(s):
        return "n/a"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def _flatten(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.extend(_flatten(v, key + "."))
        else:
            out.append((key, v))
    return out


def _mean_std(mean: Any, std: Any, floatfmt: str) -> str:
    if _is_missing(mean):
        return "n/a"
    spread = "n/a" if _is_missing(std) else format(float(std), floatfmt)
    return f"{format(float(mean), floatfmt)} ± {spread}"


def redundant_metrics(metrics_table: Sequence[Mapping[str, Any]]) -> set[str]:
    """Metrics whose every value equals another metric's on the same row (exact match and
    ROUGE-L on one-number answers): shown once, under the first name."""
    cells: dict[str, dict[tuple, Any]] = {}
    for r in metrics_table:
        key = tuple((k, str(v)) for k, v in sorted(r.items()) if k not in ("metric", "mean", "std"))
        cells.setdefault(str(r["metric"]), {})[key] = (r.get("mean"), r.get("std"))
    names = list(cells)
    drop = set()
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if b not in drop and cells[a] == cells[b]:
                drop.add(b)
    return drop


def _metrics_pivot(metrics_table: Sequence[Mapping[str, Any]], floatfmt: str) -> str:
    """The paper's layout: one row per model, one column per (form, decoding, metric)."""
    drop = redundant_metrics(metrics_table)
    models: dict[str, None] = {}
    columns: dict[str, None] = {}
    cells: dict[tuple[str, str], Mapping[str, Any]] = {}
    for r in metrics_table:
        if r["metric"] in drop:
            continue
        col = " ".join(str(r[k]) for k in ("form", "decoding", "metric") if r.get(k) is not None)
        model = str(r["model"])
        models.setdefault(model)
        columns.setdefault(col)
        cells[(model, col)] = r
    rows = []
    for model in models:
        ns = {cells[(model, c)].get("n_seeds") for c in columns if (model, c) in cells}
        row: dict[str, Any] = {"model": model}
        for c in columns:
            r = cells.get((model, c))
            row[c] = "n/a" if r is None else _mean_std(r.get("mean"), r.get("std"), floatfmt)
        row["seeds"] = ns.pop() if len(ns) == 1 else "varies"
        rows.append(row)
    table = markdown_table(rows, ["model", *columns, "seeds"], right=list(columns))
    if drop:
        table += ("\n\n" + ", ".join(sorted(drop)) + " equals another metric on every row "
                  "and is not shown twice.")
    return table


def _differences_table(differences: Sequence[Mapping[str, Any]], floatfmt: str) -> str:
    drop = redundant_metrics([{**d, "mean": d["diff"], "std": d["low"]} for d in differences])
    rows = []
    for d in differences:
        if d["metric"] in drop:
            continue
        sig = d["low"] > 0 or d["high"] < 0
        rows.append({"model": d["model"], "vs": d["reference"], "form": d["form"],
                     "decoding": d["decoding"], "metric": d["metric"],
                     "difference": format(d["diff"], "+" + floatfmt),
                     "95% interval": f"[{d['low']:+{floatfmt}}, {d['high']:+{floatfmt}}]"
                                     + (" *" if sig else ""),
                     "seeds x rows": f"{d['n_seeds']} x {d['n_rows']}"})
    return markdown_table(rows)


def _stage_rows(stage_summaries: Mapping[str, Mapping[str, Any]]) -> tuple[list[dict], list[str]]:
    """One row per stage: its artifact's fingerprint (12 characters), how long it took, and its
    own key figures in one cell (``rows=2000, kept_rate=0.87, inputs_cut=3``), so that stages
    with different figures do not make a wide table of empty cells."""
    rows = []
    for stage, summary in stage_summaries.items():
        row: dict[str, Any] = {"stage": stage, "fingerprint": "", "seconds": "", "figures": ""}
        figures = []
        for k, v in summary.items():
            if k == "fingerprint" and isinstance(v, str):
                row["fingerprint"] = f"`{v[:12]}`"
            elif k in ("seconds", "wall_seconds", "duration_s"):
                row["seconds"] = _fmt_seconds(v)
            elif isinstance(v, Mapping):
                figures.append(f"{k}: " + ", ".join(f"{a}={b}" for a, b in v.items()))
            elif isinstance(v, (str, os.PathLike)) and any(s in k for s in ("path", "artifact",
                                                                          "dir", "uri")):
                figures.append(f"{k}=`{os.fspath(v)}`")
            else:
                figures.append(f"{k}={_cell(v, '.4g')}")
        row["figures"] = ", ".join(figures)
        rows.append(row)
    return rows, ["stage", "fingerprint", "seconds", "figures"]


def _fenced(text: str, max_chars: int) -> str:
    text = "" if text is None else str(text)
    if len(text) > max_chars:
        text = text[:max_chars] + f"\n… [truncated: {len(text):,} characters in all]"
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def _image_link(caption: str, path: str | os.PathLike, out_dir: Path) -> str:
    p = Path(path)
    absolute = p if p.is_absolute() else (Path.cwd() / p)
    rel = Path(os.path.relpath(absolute.resolve(), out_dir.resolve())).as_posix()
    alt = caption.replace("[", "(").replace("]", ")").replace("\n", " ")
    line = f"![{alt}]({urllib.parse.quote(rel)})"
    if not absolute.is_file():
        line += f"\n\n_(image not found when the report was written: `{os.fspath(path)}`)_"
    return line


def write_report(
    out_dir: str | os.PathLike,
    *,
    title: str,
    config_summary: Mapping[str, Any],
    metrics_table: Sequence[Mapping[str, Any]],
    stage_summaries: Mapping[str, Mapping[str, Any]],
    images: Mapping[str, str | os.PathLike],
    samples: Sequence[Mapping[str, Any]],
    differences: Sequence[Mapping[str, Any]] = (),
    sections: Mapping[str, str] | None = None,
    floatfmt: str = ".2f",
    max_sample_chars: int = 1500,
) -> Path:
    """Write ``out_dir/report.md`` and return its path.

    Args:
        title: the report's heading.
        config_summary: the settings worth showing (nested dicts are flattened to dotted keys).
        metrics_table: rows ``{"model", "metric", "mean", "std", "n_seeds"}`` with optional
            ``form`` and ``decoding``; rendered in the paper's layout, one row per model and one
            column per (form, decoding, metric), "mean ± std" (std None/NaN -> "n/a"). A metric
            equal to another on every row is shown once.
        differences: rows ``{"model", "reference", "form", "decoding", "metric", "diff", "low",
            "high", "n_seeds", "n_rows"}`` (paired differences with 95% intervals).
        sections: ``{heading: markdown}`` written after the differences, as given.
        stage_summaries: ``{stage: {"artifact": path, "fingerprint": str, "seconds": float,
            <counts>...}}``; any keys, shown as columns (fingerprint cut to 12 characters,
            seconds as a duration, dict values as ``k=v`` lists).
        images: ``{caption: png path}``, embedded by path relative to ``out_dir`` (a missing
            file is still linked, with a note).
        samples: ``[{"prompt", "reference", "predictions": {model: text}, "id"?}]``; instead of
            ``predictions``, any other string-valued keys are taken as model predictions.
            Texts longer than ``max_sample_chars`` are cut, with their full length noted.

    The report carries no timestamp: the same inputs give the same bytes. Written atomically
    (temporary file, then rename).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts: list[str] = [f"# {title}", ""]

    parts += ["## Metrics", ""]
    if metrics_table:
        parts += [
            "Mean ± sample standard deviation (ddof = 1) over training seeds (sampled decoding: "
            "each seed's score is first averaged over the decoding seeds); \"n/a\" where one "
            "seed leaves the std undefined. ROUGE-L: F-measure x 100 by `rouge_score` (stemmer "
            "on) on the answer (the CoT form's line after \"Therefore, the answer is:\"); exact "
            "match: x 100 on the extracted answer.",
            "",
            _metrics_pivot(metrics_table, floatfmt),
            "",
        ]
    else:
        parts += ["_No metrics._", ""]
    if differences:
        parts += ["## Paired differences", "",
                  "Each student minus its reference (the SFT student; the student trained on "
                  "its KD base alone), on the same eval rows and training seeds. 95% percentile "
                  "bootstrap intervals over training seeds and eval rows; * marks an interval "
                  "that excludes 0.", "", _differences_table(differences, floatfmt), ""]

    for heading, body in (sections or {}).items():
        parts += [f"## {heading}", "", body, ""]

    if images:
        parts += ["## Figures", ""]
        for caption, path in images.items():
            parts += [f"### {caption}", "", _image_link(caption, path, out), ""]

    parts += ["## Stages", ""]
    if stage_summaries:
        rows, columns = _stage_rows(stage_summaries)
        parts += [markdown_table(rows, columns, floatfmt=floatfmt, right=["seconds"]), ""]
    else:
        parts += ["_No stage summaries._", ""]

    parts += ["## Configuration", ""]
    if config_summary:
        rows = [{"setting": k, "value": v} for k, v in _flatten(config_summary)]
        parts += [markdown_table(rows, ["setting", "value"], floatfmt="g"), ""]
    else:
        parts += ["_No configuration given._", ""]

    parts += ["## Sample generations", ""]
    if not samples:
        parts += ["_No samples._", ""]
    for i, sample in enumerate(samples, 1):
        head = f"### Sample {i}"
        if sample.get("id") is not None:
            head += f" (`{sample['id']}`)"
        parts += [head, "", "**Prompt**", "", _fenced(sample.get("prompt", ""), max_sample_chars),
                  "", "**Reference**", "",
                  _fenced(sample.get("reference", ""), max_sample_chars), ""]
        preds = sample.get("predictions")
        if preds is None:
            preds = {k: v for k, v in sample.items()
                     if k not in ("prompt", "reference", "id") and isinstance(v, str)}
        for model, text in preds.items():
            parts += [f"**{model}**", "", _fenced(text, max_sample_chars), ""]

    text = "\n".join(parts).rstrip("\n") + "\n"
    path = out / "report.md"
    tmp = out / ".report.md.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
