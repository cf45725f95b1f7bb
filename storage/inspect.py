"""What the ``cot2align inspect | verify | ls | gc`` commands do, as functions and handlers.

Wiring into a command line is one call: ``add_subcommands(subparsers)`` adds the four
subcommands, each with ``set_defaults(func=handler)``; a handler takes the parsed args and
returns an exit code. ``python -m storage.inspect ...`` runs them on their own.

- ``inspect PATH [--json] [--rows N] [--tokenizer DIR]``: an artifact folder (manifest
  summary, schema per shard kind, row counts, sizes, a few decoded rows) or a store root (its
  artifacts). Tokenized rows show text and tokens side by side, with token strings when a
  tokenizer is found: ``--tokenizer``, else a manifest param whose key path names the side and
  "tokenizer" (``student.tokenizer``, ``student_tokenizer_dir``...) or, failing that, any
  single "tokenizer" param, pointing to a local folder. Teacher-cache rows show per-layer
  statistics of the hidden states.
- ``verify PATH [--repair]``: exit 0 when every artifact is complete and every shard and side
  file matches its manifest (sha256, size, rows in the Parquet footer), the manifest its
  digest, and each upstream manifest the digest recorded; else 1, each problem named. On a
  store root: every artifact folder, partial (never finished) and broken ones included;
  one being written by a live writer is noted, not failed. ``--repair`` then drops exactly
  the damaged shards and files (or sets a broken or stale artifact aside) and prints the
  command that recomputes them.
- ``ls [STORE] [--garbage] [--json]``: artifacts with stage, fingerprint, status, rows, size,
  age, the run records that name them.
- ``gc [STORE] [--yes] [--include-partial]``: lists exactly what would be removed (with
  sizes) and why the rest is kept; removes it only with ``--yes``.

A path that does not exist, a file, or a folder that is neither an artifact nor a store is
an error (exit 2) for every command.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from storage.errors import ManifestError, StoreError
from storage.fs import LocalFS, filesystem_for, is_tmp_name
from storage.manifest import (INVALID_MANIFEST, is_complete, load_manifest, read_manifest,
                              stage_of)
from storage.runs import RUNS_DIR
from storage.schemas import ListColumn, detect_kind
from storage.shards import kind_of
from storage.store import CACHE_DIR, ArtifactStore, StoreEntry
from storage.verify import CheckReport, check_artifact, looks_like_artifact, store_root_of

DEFAULT_STORE_ENV = "COT2ALIGN_STORE"
TEXT_CHARS = 400


# ---------------------------------------------------------------------------------------
# Formatting helpers


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def human_age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _short(text: Any, limit: int = TEXT_CHARS) -> str:
    text = str(text)
    return text if len(text) <= limit else text[:limit] + f"... [{len(text)} chars]"


def _json_value(v: Any) -> Any:
    """A sample cell as JSON keeps its type: numbers stay numbers (NaN and inf become None,
    JSON has no such values), booleans and None stay; long text is cut, other values are
    shown as text."""
    if v is None or isinstance(v, (bool, int)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    return _short(v, 200)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), *(line(r) for r in rows)])


# ---------------------------------------------------------------------------------------
# Locating things


class PathError(StoreError):
    """A command was given a path that is not what it needs."""


def looks_like_store(fs: LocalFS, path: str) -> bool:
    """An empty folder, one with ``_runs/`` or ``_cache/``, or one holding
    ``<stage>/<fingerprint>/`` artifact folders."""
    names = fs.listdir(path)
    if not names or RUNS_DIR in names or CACHE_DIR in names:
        return True
    for stage in names:
        stage_dir = fs.join(path, stage)
        if stage.startswith((".", "_")) or not fs.isdir(stage_dir):
            continue
        if any(looks_like_artifact(fs, fs.join(stage_dir, fp)) for fp in fs.listdir(stage_dir)):
            return True
    return False


def locate(path: str | os.PathLike, want: str = "either") -> tuple[str, LocalFS, str]:
    """``("artifact" | "store", fs, path)`` for PATH; :class:`PathError` when it does not
    exist, is a file, or is neither (``want="store"``: must be a store)."""
    fs, p = filesystem_for(path)
    url = fs.url(p)
    if not fs.exists(p):
        raise PathError(f"{url} does not exist: give an artifact folder "
                        "(<store>/<stage>/<fingerprint>) or a store root (the config's `store:`)")
    if not fs.isdir(p):
        raise PathError(f"{url} is a file, not an artifact folder or a store root")
    if want != "store" and looks_like_artifact(fs, p):
        return "artifact", fs, p
    if looks_like_store(fs, p):
        return "store", fs, p
    what = "a store root" if want == "store" else "an artifact folder or a store root"
    raise PathError(f"{url} is not {what}: a store holds <stage>/<fingerprint>/ folders and "
                    "_runs/; an artifact folder holds a manifest.json and its shards")


def _flatten(params: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(params, dict):
        out = {}
        for k, v in params.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: params}


def find_tokenizer_dir(params: dict[str, Any], side: str | None) -> str | None:
    """A local tokenizer folder named by the params for ``side`` (see the module doc)."""
    flat = {k.lower(): v for k, v in _flatten(params).items()
            if isinstance(v, str) and os.path.isdir(v)}
    candidates = [k for k in flat if "tokenizer" in k]
    if side:
        sided = [k for k in candidates if side in k]
        if sided:
            return flat[sorted(sided)[0]]
    if len(candidates) == 1:
        return flat[candidates[0]]
    return None


def _load_tokenizer(directory: str | None):
    if not directory:
        return None, None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(directory), None
    except Exception as e:  # noqa: BLE001 - show ids when the tokenizer cannot load
        return None, f"tokenizer at {directory} did not load ({type(e).__name__}: {e})"


# ---------------------------------------------------------------------------------------
# Samples per table kind


def _sample_rationales(batch: pa.RecordBatch) -> list[dict[str, Any]]:
    return batch.to_pylist()


def _sample_tokenized(batch: pa.RecordBatch, tokenizer) -> list[dict[str, Any]]:
    ids_col = ListColumn(batch.column("input_ids"))
    mask_col = ListColumn(batch.column("response_mask"))
    starts = ListColumn(batch.column("offsets_start"))
    ends = ListColumn(batch.column("offsets_end"))
    out = []
    for i in range(batch.num_rows):
        text = batch.column("text")[i].as_py()
        ids = ids_col[i].tolist()
        pieces = tokenizer.convert_ids_to_tokens(ids) if tokenizer is not None else None
        tokens = []
        for j, tok in enumerate(ids):
            s, e = int(starts[i][j]), int(ends[i][j])
            tokens.append({"i": j, "id": tok, "token": pieces[j] if pieces else None,
                           "response": bool(mask_col[i][j]), "span": [s, e], "text": text[s:e]})
        row = {"id": batch.column("id")[i].as_py(), "form": batch.column("form")[i].as_py(),
               "prompt_tokens": batch.column("prompt_tokens")[i].as_py(), "n_tokens": len(ids),
               "response_tokens": int(np.count_nonzero(mask_col[i])), "text": text,
               "tokens": tokens}
        if "mined_alignment" in batch.schema.names:
            al = ListColumn(batch.column("mined_alignment"))[i]
            row["mined_alignment"] = None if al is None else al.tolist()
        out.append(row)
    return out


def _sample_teacher_cache(batch: pa.RecordBatch) -> list[dict[str, Any]]:
    import torch

    from storage.teacher_cache import decode_rows

    out = []
    for row in decode_rows(batch):
        h = row.hidden.float()
        stats = []
        for li, layer in enumerate(row.layers):
            x = h[li]
            stats.append({
                "layer": layer,
                "mean": float(x.mean()) if x.numel() else None,
                "std": float(x.std()) if x.numel() > 1 else None,
                "min": float(x.min()) if x.numel() else None,
                "max": float(x.max()) if x.numel() else None,
                "norm": float(torch.linalg.vector_norm(x, dim=-1).mean()) if x.numel() else None,
                "finite": bool(torch.isfinite(x).all()),
            })
        out.append({"id": row.id, "form": row.form, "n_tokens": row.n_tokens,
                    "width": row.width, "dtype": str(row.hidden.dtype).replace("torch.", ""),
                    "layers": list(row.layers), "input_tokens": len(row.input_ids),
                    "topk": 0 if row.topk_ids is None else row.topk_ids.shape[1],
                    "layer_stats": stats})
    return out


# ---------------------------------------------------------------------------------------
# inspect


def inspect_artifact(fs: LocalFS, path: str, rows: int = 3,
                     tokenizer_dir: str | None = None) -> dict[str, Any]:
    """The summary ``inspect`` shows for one artifact folder (complete or not)."""
    try:
        manifest, broken = load_manifest(fs, path), None
    except ManifestError as e:
        manifest, broken = read_manifest(fs, path), str(e)
    complete = is_complete(manifest) and broken is None
    invalid = read_manifest(fs, path, INVALID_MANIFEST)
    meta = manifest if complete else (invalid or {})
    if complete:
        shards = [{k: s[k] for k in ("name", "kind", "rows", "bytes")} for s in manifest["shards"]]
    else:
        shards = []
        for name in fs.listdir(path):
            if name.endswith(".parquet") and not is_tmp_name(name):
                full = fs.join(path, name)
                try:
                    n = fs.parquet_file(full).metadata.num_rows
                except Exception:  # noqa: BLE001
                    continue
                shards.append({"name": name[:-8], "kind": kind_of(name[:-8]), "rows": n,
                               "bytes": fs.size(full)})
    status = "complete" if complete else (
        "broken" if broken else "invalidated" if invalid else "partial")
    parent, fp = os.path.split(path.rstrip("/"))
    meta = {"stage": os.path.basename(parent), "fingerprint": fp, **meta}
    summary: dict[str, Any] = {
        "path": fs.url(path), "status": status,
        **{k: meta.get(k) for k in ("stage", "fingerprint", "version", "params", "upstream",
                                     "info", "timings", "libraries")},
        "rows": sum(s["rows"] for s in shards),
        "bytes": sum(s["bytes"] for s in shards) + sum(
            f["bytes"] for f in (meta.get("files") or [])),
        "shards": shards, "files": meta.get("files") or [], "kinds": {},
        "notes": [broken] if broken else [],
    }
    tokenizers: dict[str, Any] = {}
    for kind in sorted({s["kind"] for s in shards}):
        of_kind = [s for s in shards if s["kind"] == kind]
        try:
            pf = fs.parquet_file(fs.join(path, of_kind[0]["name"] + ".parquet"))
        except (OSError, pa.ArrowException) as e:
            summary["notes"].append(f"shard {of_kind[0]['name']} is unreadable ({e}): "
                                    f"`cot2align verify --repair {fs.url(path)}`")
            continue
        schema = pf.schema_arrow
        table_kind = detect_kind(schema)
        entry = {"table": table_kind, "shards": len(of_kind),
                 "rows": sum(s["rows"] for s in of_kind),
                 "bytes": sum(s["bytes"] for s in of_kind),
                 "row_groups": pf.metadata.num_row_groups,
                 "schema": schema.to_string(show_schema_metadata=False), "samples": []}
        if rows > 0 and pf.metadata.num_rows:
            batch = next(pf.iter_batches(batch_size=rows))
            if table_kind == "rationales":
                entry["samples"] = _sample_rationales(batch)
            elif table_kind == "tokenized":
                if kind not in tokenizers:
                    named = {**(meta.get("params") or {}), **(meta.get("info") or {})}
                    tdir = tokenizer_dir or find_tokenizer_dir(named, kind)
                    tokenizers[kind], note = _load_tokenizer(tdir)
                    entry["tokenizer"] = tdir if tokenizers[kind] is not None else None
                    if note:
                        summary["notes"].append(note)
                entry["samples"] = _sample_tokenized(batch, tokenizers[kind])
            elif table_kind == "teacher_cache":
                entry["samples"] = _sample_teacher_cache(batch)
            else:
                entry["samples"] = [{k: _json_value(v) for k, v in r.items()}
                                    for r in batch.to_pylist()]
        summary["kinds"][kind] = entry
    return summary


def inspect_store(store: ArtifactStore) -> dict[str, Any]:
    entries = store.list_artifacts()
    return {"store": store.root, "artifacts": [e.to_dict() for e in entries],
            "runs": store.runs()}


def inspect_path(path: str | os.PathLike, rows: int = 3,
                 tokenizer_dir: str | None = None) -> dict[str, Any]:
    """``inspect`` of an artifact folder or a store root; :class:`PathError` otherwise."""
    kind, fs, p = locate(path)
    if kind == "artifact":
        return inspect_artifact(fs, p, rows=rows, tokenizer_dir=tokenizer_dir)
    return inspect_store(ArtifactStore(os.fspath(path)))


def format_artifact(s: dict[str, Any]) -> str:
    out = [f"artifact  {s.get('stage')}/{s.get('fingerprint')}  ({s['status']})",
           f"path      {s['path']}"]
    timings = s.get("timings") or {}
    if timings:
        out.append(f"written   {timings.get('finished')}  ({timings.get('seconds')} s)  "
                   f"format version {s.get('version')}")
    if s.get("libraries"):
        out.append("libraries " + ", ".join(f"{k} {v}" for k, v in s["libraries"].items()))
    for key in ("params", "upstream", "info"):
        if s.get(key):
            out.append(f"{key:<9} {_short(json.dumps(s[key], sort_keys=True), 600)}")
    out.append(f"shards    {len(s['shards'])}, {s['rows']:,} rows, {human_bytes(s['bytes'])} "
               f"(with {len(s['files'])} side files)")
    for f in s["files"]:
        out.append(f"  file {f['path']}  {human_bytes(f['bytes'])}")
    for note in s.get("notes", []):
        out.append(f"note      {note}")
    for kind, k in s["kinds"].items():
        out.append("")
        out.append(f"kind {kind!r}: {k['table'] or 'table'}, {k['shards']} shards, "
                   f"{k['rows']:,} rows, {human_bytes(k['bytes'])}, "
                   f"{k['row_groups']} row groups in the first shard")
        out.extend("    " + line for line in k["schema"].splitlines())
        for i, row in enumerate(k["samples"]):
            out.append(f"  [{i}] " + _format_sample(k["table"], row))
    return "\n".join(out)


def _format_sample(table: str | None, row: dict[str, Any]) -> str:
    if table == "rationales":
        lines = [f"id={row['id']} kept={row['kept']} reason={row['filter_reason']} "
                 f"answer={row['answer']!r} prediction={row['prediction']!r} "
                 f"sample={row['sample_index']} T={row['temperature']:.2f} "
                 f"top_p={row['top_p']:.2f} seed={row['seed']}",
                 f"      prompt:    {_short(row['prompt'])!r}",
                 f"      rationale: {_short(row['rationale'])!r}"]
        return "\n".join(lines)
    if table == "tokenized":
        lines = [f"id={row['id']} form={row['form']} tokens={row['n_tokens']} "
                 f"prompt_tokens={row['prompt_tokens']} response_tokens={row['response_tokens']}",
                 f"      text: {_short(row['text'])!r}"]
        shown = row["tokens"][:64]
        body = [[str(t["i"]), str(t["id"]), repr(t["token"]) if t["token"] is not None else "",
                 "R" if t["response"] else ".", repr(t["text"])] for t in shown]
        table_text = _table(body, ["#", "id", "token", "resp", "text"])
        lines.extend("      " + line for line in table_text.splitlines())
        if len(row["tokens"]) > len(shown):
            lines.append(f"      ... {len(row['tokens']) - len(shown)} more tokens")
        return "\n".join(lines)
    if table == "teacher_cache":
        lines = [f"id={row['id']} form={row['form']} n_tokens={row['n_tokens']} "
                 f"width={row['width']} dtype={row['dtype']} layers={row['layers']} "
                 f"input_tokens={row['input_tokens']} topk={row['topk']}"]
        fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
        body = [[str(st["layer"]), fmt(st["mean"]), fmt(st["std"]), fmt(st["min"]),
                 fmt(st["max"]), fmt(st["norm"]), "yes" if st["finite"] else "NO"]
                for st in row["layer_stats"]]
        lines.extend("      " + line for line in _table(
            body, ["layer", "mean", "std", "min", "max", "norm", "finite"]).splitlines())
        return "\n".join(lines)
    return json.dumps(row, default=str)


def format_entries(entries: Sequence[StoreEntry]) -> str:
    if not entries:
        return "(no artifacts)"
    body = [[e.stage, e.fingerprint, e.status + (" (locked)" if e.locked_by else "")
             + (" (checkpoints)" if e.checkpoints and e.status != "complete" else ""),
             "-" if e.rows is None else f"{e.rows:,}", human_bytes(e.bytes), human_age(e.age_s),
             ",".join(e.referenced_by) or "-"] for e in entries]
    return _table(body, ["stage", "fingerprint", "status", "rows", "size", "age", "used by"])


def format_store(s: dict[str, Any]) -> str:
    entries = [StoreEntry(**d) for d in s["artifacts"]]
    runs = [f"  {v['config_name']} [{v['scope']}, {v['status']}{', live' if v['live'] else ''}] "
            f"{v.get('config_path') or ''} {' '.join(v.get('overrides') or [])}".rstrip()
            for v in s["runs"].values()]
    runs_text = "\n".join(runs) if runs else "  none recorded"
    return f"store {s['store']}\nruns:\n{runs_text}\n\n{format_entries(entries)}"


# ---------------------------------------------------------------------------------------
# verify, repair, ls, gc


def _stage_fp(path: str) -> tuple[str, str]:
    stage_dir, fp = path.rstrip("/").rsplit("/", 1)
    return stage_dir.rsplit("/", 1)[-1], fp


def verify_path(path: str | os.PathLike) -> list[CheckReport]:
    """Full reports for an artifact folder, or for every artifact folder of a store root."""
    kind, fs, p = locate(path)
    if kind == "artifact":
        return [check_artifact(fs, p, full=True)]
    store = ArtifactStore(os.fspath(path))
    return [check_artifact(fs, d, full=True) for _, _, d in store._artifact_dirs()]


def failed(report: CheckReport) -> bool:
    """Not OK, and not merely an artifact a live writer is still writing (or an empty
    folder)."""
    return not report.ok and report.writer is None and report.status != "absent"


def rerun_command(store: ArtifactStore, stage: str, fp: str) -> str:
    """``cot2align stage STAGE CONFIG [--set ...]`` with the config of a run record that
    names the artifact, else with a CONFIG placeholder."""
    for rec in store.runs().values():
        if rec.get("config_path") and any(stage_of(k) == stage and v == fp
                                          for k, v in rec["artifacts"].items()):
            sets = "".join(f" --set {o}" for o in rec.get("overrides") or [])
            return f"cot2align stage {stage} {rec['config_path']}{sets}"
    return f"cot2align stage {stage} CONFIG (the config that made it)"


def repair(report: CheckReport) -> list[str]:
    """Drop what is damaged in one failed artifact (and set aside what was built from it);
    lines saying what was done and what to run next."""
    fs, path = filesystem_for(report.path)
    store = ArtifactStore(store_root_of(path))
    stage, fp = _stage_fp(path)
    rerun = rerun_command(store, stage, fp)
    if report.action == "repair":
        done = store.invalidate_shards(stage, fp, report.bad_shards + report.bad_files)
        lines = [f"repaired {report.path}: dropped {', '.join(done.removed)}"]
        if report.bad_files:
            lines.append(f"  next: `{rerun}` reruns the stage (side files such as "
                         f"{', '.join(sorted({f.split('/')[0] for f in report.bad_files}))} "
                         "cannot be recomputed alone)")
        else:
            lines.append(f"  next: `{rerun}` recomputes only the dropped shards")
    elif report.action == "recompute":
        done = store.set_aside(stage, fp)
        why = "stale" if report.stale else "its manifest cannot be trusted"
        lines = [f"set aside {report.path} ({why})", f"  next: `{rerun}` recomputes it whole"]
    else:
        return [f"{report.path} is {report.status}: nothing to drop",
                f"  next: `{rerun}` finishes it (only shards whose journaled sha256 still "
                "matches are kept)"]
    if done.set_aside:
        lines.append("  set aside too, as they were built from it (their stages recompute "
                     "them): " + ", ".join(done.set_aside))
    return lines


def cmd_inspect(args: argparse.Namespace) -> int:
    try:
        summary = inspect_path(args.path, rows=args.rows, tokenizer_dir=args.tokenizer)
    except (PathError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    elif "artifacts" in summary:
        print(format_store(summary))
    else:
        print(format_artifact(summary))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    try:
        reports = verify_path(args.path)
    except PathError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not reports:
        print(f"{args.path}: an empty store, nothing to verify")
        return 0
    for r in reports:
        note = (f"  (being written by {r.writer.get('host')} pid {r.writer.get('pid')}: not "
                "checked)" if r.writer is not None else "")
        print(r.details() + note)
    bad = [r for r in reports if failed(r)]
    if not bad:
        return 0
    print(f"\n{len(bad)} of {len(reports)} artifacts FAILED verification:\n  " + "\n  ".join(
        f"{r.path}: {r.status}, " + "; ".join(str(p) for p in r.problems) for r in bad),
        file=sys.stderr)
    if not args.repair:
        print("\nrun `cot2align verify --repair PATH` to drop what is damaged", file=sys.stderr)
        return 1
    code = 0
    print()
    for r in bad:
        try:
            print("\n".join(repair(r)))
        except StoreError as e:
            print(f"could not repair {r.path}: {e}", file=sys.stderr)
            code = 1
    return code


def open_store_arg(path: str | None) -> ArtifactStore:
    """The store at PATH (default ``$COT2ALIGN_STORE`` or ./artifacts); PathError if PATH is
    missing, a file, or not a store."""
    path = path or default_store()
    locate(path, want="store")
    return ArtifactStore(path)


def default_store() -> str:
    return os.environ.get(DEFAULT_STORE_ENV, "./artifacts")


def cmd_ls(args: argparse.Namespace) -> int:
    try:
        store = open_store_arg(args.store)
    except PathError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    entries = store.garbage() if args.garbage else store.list_artifacts()
    if args.json:
        print(json.dumps([e.to_dict() for e in entries], indent=2, default=str))
    else:
        print(format_entries(entries))
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    try:
        store = open_store_arg(args.store)
    except PathError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    entries = store.list_artifacts(include_partial=args.include_partial)
    garbage = [e for e in entries if e.keep is None]
    notable = [e for e in entries if e.keep is not None and not e.referenced_by]
    for e in notable:
        print(f"keeping {e.stage}/{e.fingerprint} ({human_bytes(e.bytes)}): {e.keep}")
    if not garbage:
        print(f"nothing to remove in {store.root}: every artifact is named by a run record, "
              "held by a live writer, or holds checkpoints")
        return 0
    total = human_bytes(sum(e.bytes for e in garbage))
    print(f"{'removing' if args.yes else 'would remove'} {len(garbage)} artifacts ({total}) "
          "that no run record names:")
    print(format_entries(garbage))
    if not args.yes:
        print("\nrerun with --yes to remove exactly these")
        return 0
    try:
        removed = store.remove(garbage, include_partial=args.include_partial)
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"\nremoved {len(removed)} artifacts ({total})")
    return 0


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``inspect``, ``verify``, ``ls`` and ``gc``; each sets ``func`` to its handler."""
    p = subparsers.add_parser("inspect", help="summarise an artifact folder or a store root")
    p.add_argument("path", help="artifact folder (<store>/<stage>/<fingerprint>) or store root")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--rows", type=int, default=3, help="sample rows per shard kind (default 3)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder to decode token ids")
    p.set_defaults(func=cmd_inspect)

    p = subparsers.add_parser("verify", help="re-hash shards and files against manifests")
    p.add_argument("path", help="artifact folder or store root")
    p.add_argument("--repair", action="store_true",
                   help="drop damaged shards/files (or set broken/stale artifacts aside) so "
                        "that their stage recomputes them, and print the command to run")
    p.set_defaults(func=cmd_verify)

    p = subparsers.add_parser("ls", help="list the artifacts of a store")
    p.add_argument("store", nargs="?", default=None,
                   help=f"store root (default ${DEFAULT_STORE_ENV} or ./artifacts)")
    p.add_argument("--garbage", action="store_true",
                   help="only the artifacts gc would remove")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_ls)

    p = subparsers.add_parser("gc", help="remove artifacts that no run record names")
    p.add_argument("store", nargs="?", default=None,
                   help=f"store root (default ${DEFAULT_STORE_ENV} or ./artifacts)")
    p.add_argument("--yes", action="store_true", help="really remove them")
    p.add_argument("--include-partial", action="store_true",
                   help="also remove unnamed partial artifacts that hold training checkpoints")
    p.set_defaults(func=cmd_gc)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m storage.inspect",
                                     description="Inspect and maintain a cot2align store.")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
