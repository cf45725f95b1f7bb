"""The errors the storage layer raises; each message names the path and what to do."""
from __future__ import annotations

import errno


class StoreError(RuntimeError):
    """The store cannot be used as asked (not writable, bad name, bad manifest...)."""


class ArtifactLockedError(StoreError):
    """Another live writer holds the artifact's lock and did not release it in time."""


class ArtifactCompleteError(StoreError):
    """A write was attempted into an artifact that is already complete."""


class ManifestError(StoreError):
    """A ``manifest.json`` that cannot be trusted: unreadable JSON, no content digest, or a
    digest that does not match its content (edited by hand, or damaged)."""


class CorruptDataError(StoreError):
    """A shard or side file whose bytes do not match its manifest (hash, size, rows, footer).

    ``artifact`` is the artifact folder, ``relpath`` the file inside it, ``reason`` what did
    not match. The message ends with the command that repairs it.
    """

    def __init__(self, artifact: str, relpath: str, reason: str) -> None:
        self.artifact, self.relpath, self.reason = artifact, relpath, reason
        stage = artifact.rstrip("/").rsplit("/", 2)[-2]
        redo = ("recomputes only the dropped shards" if relpath.endswith(".parquet")
                else "reruns the stage (a side file cannot be recomputed alone)")
        super().__init__(
            f"{artifact}/{relpath} is damaged: {reason}. Nothing read from it was used. Repair: "
            f"`cot2align verify --repair {artifact}` drops what is damaged, then "
            f"`cot2align stage {stage} CONFIG` (or `cot2align run CONFIG`) {redo}.")

    def __reduce__(self):  # picklable across processes (task runners) with its fields
        return (type(self), (self.artifact, self.relpath, self.reason))


class StoreWriteError(StoreError):
    """Writing into the store failed at the OS level (disk full, I/O error, read-only); the
    temporary files of the failed write are already removed."""

    def __init__(self, message: str, os_error: OSError | None = None) -> None:
        self.os_error = os_error
        super().__init__(message)


READ_ONLY_FIX = ("choose a writable store with the config key `store:` (or `--set store=PATH` on "
                 "the command line), or fix the folder's permissions; a finished store can be "
                 "reused read-only, only writing needs access")


def describe_os_error(e: OSError, what: str, path: str, *, after: str = "") -> StoreWriteError:
    """A :class:`StoreWriteError` whose message names ``path``, the cause and the fix.

    ``what`` says what was being written ("shard x of generate/abc"), ``after`` what state
    the artifact is in now (e.g. "finished shards are kept; rerun to resume").
    """
    code = getattr(e, "errno", None)
    cause = e.strerror or str(e) or type(e).__name__
    if code in (errno.ENOSPC, errno.EDQUOT):
        fix = ("the disk is full: free space on the store's disk (see `df -h`) or move the "
               "store (config key `store:`), then rerun")
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = f"the store is not writable: {READ_ONLY_FIX}"
    else:
        fix = "check the disk and the path, then rerun"
    tail = f"; {after}" if after else ""
    return StoreWriteError(f"could not write {what} at {path} ({cause}): {fix}{tail}", e)
