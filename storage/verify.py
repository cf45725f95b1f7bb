"""Checking an artifact's bytes against its manifest."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from storage.fs import LocalFS, filesystem_for
from storage.manifest import INVALID_MANIFEST, MANIFEST, is_complete, read_manifest


@dataclass
class Problem:
    """One thing that does not match: ``what`` is "shard", "file" or "manifest"."""

    what: str
    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.what} {self.name}: {self.reason}"


@dataclass
class VerifyReport:
    path: str
    problems: list[Problem] = field(default_factory=list)
    shards_checked: int = 0
    files_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def bad_shards(self) -> list[str]:
        """Names of the shards that are missing, truncated or altered."""
        return [p.name for p in self.problems if p.what == "shard"]

    @property
    def bad_files(self) -> list[str]:
        return [p.name for p in self.problems if p.what == "file"]

    def summary(self) -> str:
        head = (f"{self.path}: {'OK' if self.ok else 'FAILED'} "
                f"({self.shards_checked} shards, {self.files_checked} files checked)")
        return "\n".join([head, *(f"  {p}" for p in self.problems)])


def _check(fs: LocalFS, path: str, size: int, sha256: str) -> str | None:
    if not fs.exists(path):
        return "missing"
    actual = fs.size(path)
    if actual < size:
        return f"truncated: {actual} of {size} bytes"
    if actual != size:
        return f"size differs: {actual} bytes, manifest says {size}"
    if fs.sha256(path) != sha256:
        return "sha256 differs from the manifest (altered)"
    return None


def verify_dir(fs: LocalFS, artifact_dir: str) -> VerifyReport:
    report = VerifyReport(path=fs.url(artifact_dir))
    manifest = read_manifest(fs, artifact_dir)
    if not is_complete(manifest):
        invalid = fs.exists(fs.join(artifact_dir, INVALID_MANIFEST))
        reason = ("invalidated (manifest.invalid.json): rerun the stage to recompute its bad shards"
                  if invalid else f"no complete {MANIFEST}: the artifact was never finished")
        report.problems.append(Problem("manifest", MANIFEST, reason))
        return report
    for shard in manifest.get("shards", []):
        report.shards_checked += 1
        reason = _check(fs, fs.join(artifact_dir, shard["name"] + ".parquet"),
                        int(shard["bytes"]), shard["sha256"])
        if reason:
            report.problems.append(Problem("shard", shard["name"], reason))
    for rec in manifest.get("files", []):
        report.files_checked += 1
        reason = _check(fs, fs.join(artifact_dir, *rec["path"].split("/")), int(rec["bytes"]),
                        rec["sha256"])
        if reason:
            report.problems.append(Problem("file", rec["path"], reason))
    return report


def verify(artifact_path: str | os.PathLike) -> VerifyReport:
    """Re-hash every shard and side file of the artifact at ``artifact_path`` (a local folder
    or an fsspec URL) against its manifest; missing, truncated or altered ones are named."""
    fs, path = filesystem_for(artifact_path)
    return verify_dir(fs, path)
