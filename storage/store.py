"""The artifact store: each stage's output at ``<root>/<stage>/<fingerprint>/``.

Writing::

    store = ArtifactStore("./artifacts")            # or "s3://bucket/prefix", "memory://x"
    fp = fingerprint("tokenize", params, {"generate": gen_fp}, version=1)
    with store.writer("tokenize", fp, params=params, upstream={...}, version=1) as w:
        if w.complete:                               # another run finished it while we waited
            return w.artifact
        for i, rows in enumerate(chunks):
            name = f"student-{i:05d}"
            if name in w.done_shards():              # whole shards of a crashed run are kept
                continue
            w.write_shard(name, table_of(rows))
        w.write_file("vocab.json", data)
        w.info["kept"] = n_kept

Reusing::

    report = store.check("tokenize", fp)             # the quick check, milliseconds
    if report.ok:                                    # else report.action says what to do
        log.info("reused artifact tokenize/%s (%s)", fp, report.summary())
        art = report.artifact

See :mod:`storage.writer` (journal, resume, ``replace=True`` for ``--force``, invalidation),
:mod:`storage.artifact` (hash-checked reads), :mod:`storage.verify` (the checks),
:mod:`storage.runs` (run records).

Runs and garbage: :meth:`ArtifactStore.begin_run` records, when a run starts, the
fingerprints it will use, keyed by config file, ``name:``, scope and overrides. gc
(:meth:`ArtifactStore.garbage`) offers only artifacts that no record names, no live writer
holds, and, unless asked, that are not partial artifacts holding training checkpoints;
:meth:`ArtifactStore.remove` deletes them.
"""
from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from storage.artifact import Artifact, load_artifact, native_path, open_artifact
from storage.errors import READ_ONLY_FIX, ManifestError, StoreError
from storage.fingerprint import ContentCache, content_digest, fingerprint
from storage.fs import filesystem_for
from storage.locks import HEARTBEAT_EVERY_S, LOCK_NAME, LOG_EVERY_S, STALE_AFTER_S, ArtifactLock
from storage.manifest import (INVALID_MANIFEST, MANIFEST, is_complete, load_manifest, parse_iso,
                              stage_of)
from storage.runs import RunRecord, begin_run, read_runs
from storage.shards import CHECKPOINTS_DIR, FileRecord, ShardRecord
from storage.verify import CheckReport, VerifyReport, check_artifact, upstream_digest, verify
from storage.writer import ArtifactWriter, invalidate_in, set_aside

__all__ = [
    "ArtifactStore", "ArtifactWriter", "Artifact", "StoreEntry", "ShardRecord", "FileRecord",
    "CheckReport", "VerifyReport", "Repair", "RunRecord", "StoreError", "fingerprint", "verify",
    "open_artifact",
]

CACHE_DIR = "_cache"
DEFAULT_ROOT = "./artifacts"
_STAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
log = logging.getLogger("cot2align")


def _check_stage_fp(stage: str, fp: str) -> None:
    if not isinstance(stage, str) or not _STAGE.match(stage):
        raise StoreError(f"stage name {stage!r} is not allowed: letters, digits, '_', '-', '.' "
                         "(not starting with '_', which is reserved for the store's own folders)")
    if not isinstance(fp, str) or not _STAGE.match(fp):
        raise StoreError(f"fingerprint {fp!r} is not allowed: use the hex string of fingerprint()")


@dataclass
class Repair:
    """What a repair did: paths removed inside the artifact, and the artifacts built from it
    that were set aside (``"stage/fingerprint"``), to be recomputed when their stage runs."""

    removed: list[str]
    set_aside: list[str]


@dataclass
class StoreEntry:
    """One artifact folder as :meth:`ArtifactStore.list_artifacts` sees it."""

    stage: str
    fingerprint: str
    path: str
    status: str                     # "complete" | "partial" | "invalidated" | "broken"
    rows: int | None
    bytes: int
    age_s: float
    referenced_by: list[str] = field(default_factory=list)
    locked_by: dict[str, Any] | None = None
    checkpoints: bool = False       # holds training checkpoints (resumable work)
    keep: str | None = None         # why gc keeps it (None: garbage)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class ArtifactStore:
    """A folder (or fsspec URL) holding ``<stage>/<fingerprint>/`` artifacts, ``_runs/`` and
    ``_cache/``. Reading needs no write access; writing checks it first.

    ``lock_stale_after`` / ``lock_heartbeat_every`` / ``lock_log_every`` (seconds) set the
    writer locks' heartbeat bound, refresh period and waiting-log period (:mod:`storage.locks`).
    """

    def __init__(self, root: str | os.PathLike = DEFAULT_ROOT, *,
                 lock_stale_after: float = STALE_AFTER_S,
                 lock_heartbeat_every: float = HEARTBEAT_EVERY_S,
                 lock_log_every: float = LOG_EVERY_S) -> None:
        self.fs, self.root_path = filesystem_for(root)
        self.root = self.fs.url(self.root_path)
        self.lock_stale_after = lock_stale_after
        self.lock_heartbeat_every = lock_heartbeat_every
        self.lock_log_every = lock_log_every
        self._writable = False

    def __repr__(self) -> str:
        return f"ArtifactStore({self.root!r})"

    def artifact_dir(self, stage: str, fp: str) -> str:
        _check_stage_fp(stage, fp)
        return self.fs.join(self.root_path, stage, fp)

    def path(self, stage: str, fp: str) -> Path | str:
        return native_path(self.fs, self.artifact_dir(stage, fp))

    def lock(self, artifact_dir: str, label: str, timeout: float | None = 600.0) -> ArtifactLock:
        """The lock of an artifact folder, with this store's heartbeat settings."""
        return ArtifactLock(self.fs, artifact_dir, label, timeout=timeout,
                            stale_after=self.lock_stale_after,
                            heartbeat_every=self.lock_heartbeat_every,
                            log_every=self.lock_log_every)

    # Writability -----------------------------------------------------------------------
    def check_writable(self) -> None:
        """Raise a clear :class:`StoreError` now if the root cannot hold new artifacts
        (only writing needs this: reading a finished store works read-only)."""
        if self._writable:
            return
        root = self.root
        if self.fs.exists(self.root_path) and not self.fs.isdir(self.root_path):
            raise StoreError(f"the artifact store root {root} is a file, not a folder: remove or "
                             "rename that file, or choose another store with the config key "
                             "`store:` (or `--set store=PATH` on the command line)")
        try:
            self.fs.makedirs(self.root_path)
        except OSError as e:
            raise StoreError(f"cannot create the artifact store root {root} "
                             f"({e.strerror or e}): {READ_ONLY_FIX}") from e
        probe = self.fs.join(self.root_path, f".write-probe-{os.getpid()}")
        try:
            self.fs.write_atomic(probe, b"")
            self.fs.remove(probe)
        except OSError as e:
            raise StoreError(f"the artifact store root {root} is not writable "
                             f"({e.strerror or e}): {READ_ONLY_FIX}") from e
        self._writable = True

    # Writing and reading ---------------------------------------------------------------
    def writer(self, stage: str, fp: str, *, params: dict[str, Any],
               upstream: dict[str, str] | None = None, version: int = 1,
               lock_timeout: float | None = 600.0, invalidate: Iterable[str] = (),
               replace: bool = False) -> ArtifactWriter:
        """An :class:`ArtifactWriter` for ``<stage>/<fp>``; use it as a context manager.

        ``upstream`` maps each upstream key (``stage`` or ``stage[variant]``) to its
        fingerprint; the writer records those artifacts' manifest digests itself when it
        opens. ``invalidate`` names shards/side files to drop first (a damaged artifact:
        ``report.bad_shards + report.bad_files``). ``replace=True`` (``--force``) builds a
        new artifact beside the complete one and swaps it in only when it commits.
        """
        return ArtifactWriter(self, stage, fp, params=params, upstream=upstream or {},
                              version=version, lock_timeout=lock_timeout,
                              invalidate=invalidate, replace=replace)

    def get(self, stage: str, fp: str) -> Artifact | None:
        """The complete artifact ``<stage>/<fp>``, or None (absent, partial or invalidated);
        :class:`~storage.errors.ManifestError` when its manifest cannot be trusted. Does not
        check the shards: see :meth:`check`."""
        return load_artifact(self.fs, self.artifact_dir(stage, fp))

    def check(self, stage: str, fp: str, *, full: bool = False) -> CheckReport:
        """The quick check of ``<stage>/<fp>`` (``full``: with hashes), never raising for bad
        data: ``report.ok`` -> reuse ``report.artifact``; else ``report.action`` says what
        the stage should do (see :class:`~storage.verify.CheckReport`)."""
        path = self.artifact_dir(stage, fp)
        report = check_artifact(self.fs, path, full=full)
        if report.status == "complete":
            try:
                report.artifact = load_artifact(self.fs, path)
            except ManifestError:       # changed between the two reads
                report.status = "broken"
        return report

    def verify(self, stage: str, fp: str) -> CheckReport:
        return self.check(stage, fp, full=True)

    def upstream_digests(self, upstream: dict[str, str]) -> dict[str, str]:
        """``{key: content digest}`` of the complete upstream artifacts named by
        ``{key: fingerprint}`` (absent or incomplete ones are left out)."""
        out = {}
        for key, fp in upstream.items():
            digest, _ = upstream_digest(self.fs, self.root_path, key, fp)
            if digest is not None:
                out[key] = digest
        return out

    def downstream_of(self, stage: str, fp: str) -> list[tuple[str, str]]:
        """``(stage, fingerprint)`` of the complete artifacts built from ``<stage>/<fp>``."""
        out = []
        for entry in self._artifact_dirs():
            try:
                manifest = load_manifest(self.fs, entry[2])
            except ManifestError:
                continue
            if is_complete(manifest) and any(
                    stage_of(k) == stage and v == fp
                    for k, v in manifest.get("upstream", {}).items()):
                out.append(entry[:2])
        return out

    # Repair ----------------------------------------------------------------------------
    def invalidate_shards(self, stage: str, fp: str, names: Iterable[str],
                          lock_timeout: float | None = 60.0) -> Repair:
        """Drop the named shards (and/or side files, by path; a file drops its registered
        folder) so that the stage's next writer recomputes them alone; the manifest moves to
        ``manifest.invalid.json``. Every artifact built from this one is set aside
        (:meth:`set_aside_downstream`)."""
        path = self.artifact_dir(stage, fp)
        self.check_writable()
        with self.lock(path, f"{stage}/{fp} in {self.root}", timeout=lock_timeout):
            removed = invalidate_in(self.fs, path, names)
        return Repair(removed, self.set_aside_downstream(stage, fp, lock_timeout))

    def set_aside(self, stage: str, fp: str, lock_timeout: float | None = 60.0) -> Repair:
        """Make ``<stage>/<fp>`` recompute whole (a manifest that cannot be trusted, a stale
        artifact): its manifest becomes ``manifest.invalid.json`` and its files are deleted;
        every artifact built from it is set aside too."""
        path = self.artifact_dir(stage, fp)
        self.check_writable()
        with self.lock(path, f"{stage}/{fp} in {self.root}", timeout=lock_timeout):
            set_aside(self.fs, path)
        return Repair([MANIFEST], self.set_aside_downstream(stage, fp, lock_timeout))

    def set_aside_downstream(self, stage: str, fp: str,
                             lock_timeout: float | None = 60.0) -> list[str]:
        """Set aside every complete artifact built from ``<stage>/<fp>``, transitively; they
        may hold results of damaged bytes. Returns them as ``"stage/fingerprint"``."""
        done: list[str] = []
        todo = self.downstream_of(stage, fp)
        while todo:
            down_stage, down_fp = todo.pop(0)
            label = f"{down_stage}/{down_fp}"
            if label in done:
                continue
            path = self.artifact_dir(down_stage, down_fp)
            with self.lock(path, f"{label} in {self.root}", timeout=lock_timeout):
                set_aside(self.fs, path)
            log.warning("set aside %s: it was built from %s/%s, which is being repaired",
                        label, stage, fp)
            done.append(label)
            todo.extend(self.downstream_of(down_stage, down_fp))
        return done

    def discard(self, stage: str, fp: str, lock_timeout: float | None = 60.0) -> None:
        """Remove one artifact (complete or not); waits for a live writer's lock like a
        writer would. (``--force`` should use ``writer(..., replace=True)`` instead, which
        keeps the old artifact until the new one is complete.)"""
        path = self.artifact_dir(stage, fp)
        if not self.fs.exists(path):
            return
        with self.lock(path, f"{stage}/{fp} in {self.root}", timeout=lock_timeout):
            for entry in self.fs.listdir(path):
                if entry != LOCK_NAME:
                    full = self.fs.join(path, entry)
                    self.fs.rmtree(full) if self.fs.isdir(full) else self.fs.remove(full)
        if self.fs.is_local:
            try:
                os.rmdir(path)
            except OSError:
                pass
        elif not self.fs.listdir(path):
            self.fs.rmtree(path)

    # Inputs by content -----------------------------------------------------------------
    def content_digest(self, path: str | os.PathLike) -> str | None:
        """:func:`storage.fingerprint.content_digest` of a local file or folder, cached in
        ``<root>/_cache/content.json`` (when the store is local and writable); None for a
        path that does not exist here (a hub id)."""
        cache = ContentCache(os.path.join(self.root_path, CACHE_DIR, "content.json")
                             if self.fs.is_local else None)
        return content_digest(path, cache)

    # Runs ------------------------------------------------------------------------------
    def begin_run(self, config_path: str | os.PathLike | None, config_name: str,
                  fingerprints: dict[str, str], *, scope: str = "run",
                  overrides: Sequence[str] = ()) -> RunRecord:
        """Record, now, that a run of this config will use ``fingerprints`` (see
        :mod:`storage.runs`); use the result as a context manager around the run."""
        self.check_writable()
        return begin_run(self.fs, self.root_path, config_path, config_name, fingerprints,
                         scope=scope, overrides=overrides)

    def record_run(self, config_name: str, fingerprints: dict[str, str]) -> str:
        """A finished run known only by its config name (no file path); returns the record's
        path. Prefer :meth:`begin_run`, which records the run when it starts."""
        record = self.begin_run(None, config_name, fingerprints)
        record.finish("ok")
        return record.url

    def runs(self) -> dict[str, dict[str, Any]]:
        """Every run record, by record name (see :func:`storage.runs.read_runs`)."""
        return read_runs(self.fs, self.root_path)

    # Listing and garbage ---------------------------------------------------------------
    def _artifact_dirs(self) -> list[tuple[str, str, str]]:
        out = []
        for stage in self.fs.listdir(self.root_path):
            stage_dir = self.fs.join(self.root_path, stage)
            if stage.startswith((".", "_")) or not self.fs.isdir(stage_dir):
                continue
            for fp in self.fs.listdir(stage_dir):
                path = self.fs.join(stage_dir, fp)
                if not fp.startswith(".") and self.fs.isdir(path):
                    out.append((stage, fp, path))
        return out

    def list_artifacts(self, include_partial: bool = False) -> list[StoreEntry]:
        """Every artifact folder with who uses it and why gc would keep it (``keep``; with
        ``include_partial`` partial artifacts holding checkpoints are not kept for that)."""
        refs: dict[tuple[str, str], list[str]] = {}
        for rec in self.runs().values():
            scope = "" if rec["scope"] == "run" else f" ({rec['scope']})"
            for key, fp in rec["artifacts"].items():
                refs.setdefault((stage_of(key), fp), []).append(rec["config_name"] + scope)
        now = time.time()
        entries = [self._entry(stage, fp, path, refs, now)
                   for stage, fp, path in self._artifact_dirs()]
        for e in entries:
            e.keep = self._keep_reason(e, include_partial)
        return entries

    @staticmethod
    def _keep_reason(e: StoreEntry, include_partial: bool) -> str | None:
        if e.referenced_by:
            return "named by the run record of " + ", ".join(e.referenced_by)
        if e.locked_by is not None:
            return f"being written by {e.locked_by.get('host')} pid {e.locked_by.get('pid')}"
        if e.checkpoints and e.status != "complete" and not include_partial:
            return "partial, holds training checkpoints (gc --include-partial removes it)"
        return None

    def _entry(self, stage: str, fp: str, path: str, refs: dict, now: float) -> StoreEntry:
        fs = self.fs
        try:
            manifest = load_manifest(fs, path)
            status = "complete" if is_complete(manifest) else None
        except ManifestError:
            manifest, status = None, "broken"
        if status is None:
            status = ("invalidated" if fs.exists(fs.join(path, INVALID_MANIFEST))
                      else "partial")
        files = fs.files_under(path)
        size = sum(fs.size(fs.join(path, *f.split("/"))) for f in files)
        try:
            age = now - parse_iso(manifest["timings"]["finished"])
        except (KeyError, TypeError, ValueError):
            stamps = [fs.mtime(fs.join(path, *f.split("/"))) for f in files]
            age = now - max(stamps) if stamps else 0.0
        checkpoints = any(CHECKPOINTS_DIR in f.split("/")[:-1] or f.endswith(".pt")
                          for f in files)
        return StoreEntry(stage=stage, fingerprint=fp, path=fs.url(path), status=status,
                          rows=int(manifest.get("rows", 0)) if status == "complete" else None,
                          bytes=size, age_s=age, referenced_by=sorted(refs.get((stage, fp), [])),
                          locked_by=self.lock(path, "").live_holder(), checkpoints=checkpoints)

    def garbage(self, include_partial: bool = False) -> list[StoreEntry]:
        """Artifacts gc may remove: no run record names them, no live writer holds them, and
        (unless ``include_partial``) they are not partial artifacts holding checkpoints."""
        return [e for e in self.list_artifacts(include_partial) if e.keep is None]

    def remove(self, entries: Iterable[StoreEntry], include_partial: bool = False) -> list[str]:
        """Delete the given artifacts' folders; returns the removed paths. Each is checked
        again first: if any became needed since it was listed (a run started, a writer took
        its lock), nothing is removed and :class:`StoreError` says which and why."""
        entries = list(entries)
        now = {(e.stage, e.fingerprint): e for e in self.list_artifacts(include_partial)}
        for entry in entries:
            fresh = now.get((entry.stage, entry.fingerprint))
            if fresh is not None and fresh.keep is not None:
                raise StoreError(f"not removing anything: {fresh.path} is now needed "
                                 f"({fresh.keep}); list the garbage again")
        removed = []
        for entry in entries:
            path = self.artifact_dir(entry.stage, entry.fingerprint)
            self.fs.rmtree(path)
            removed.append(self.fs.url(path))
            stage_dir = self.fs.join(self.root_path, entry.stage)
            if not self.fs.listdir(stage_dir):
                self.fs.rmtree(stage_dir)
        return removed
