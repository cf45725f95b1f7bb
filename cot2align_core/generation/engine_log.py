"""The output of an engine process, summarised instead of echoed.

vLLM writes a few hundred lines per engine (start-up notes, the same warning once per worker
thread, scheduler dumps on a crash). :class:`EngineLog` reads the process's merged
stdout/stderr line by line: every line goes to the debug log, warnings and errors are counted
per kind (vLLM's ``[file.py:line]`` location, or a Python warning's category and location), and
the last lines are kept for error messages. :meth:`EngineLog.summary` gives one line per kind
with its count and first message.
"""
from __future__ import annotations

import logging
import re
import threading
from collections import deque
from dataclasses import dataclass

# vLLM: "(EngineCore pid=1) WARNING 11-29 18:42:52 [cpu_worker.py:114] message"
_VLLM_LINE = re.compile(
    r"^(?:\[?\(?[\w ]+pid=\d+\)?\]?\s+)?(?P<level>WARNING|ERROR|CRITICAL)\s+\d\d-\d\d\s+[\d:.]+\s+"
    r"\[(?P<where>[^\]]+)\]\s*(?P<msg>.*)$")
# logging's default format: "WARNING:vllm.triton_utils.importing:message"
_STD_LINE = re.compile(r"^(?P<level>WARNING|ERROR|CRITICAL):(?P<where>[\w.]+):(?P<msg>.*)$")
# warnings.warn: "/path/file.py:12: UserWarning: message"
_PY_WARNING = re.compile(r"^(?P<where>\S+\.py:\d+): (?P<level>\w*Warning): (?P<msg>.*)$")


@dataclass
class LogKind:
    level: str
    where: str
    first_message: str
    count: int = 0


class EngineLog:
    """Counts an engine's warnings and errors per kind; keeps its last ``tail`` lines."""

    def __init__(self, logger: logging.Logger, tail: int = 40) -> None:
        self.logger = logger
        self.kinds: dict[tuple[str, str], LogKind] = {}
        self.tail: deque[str] = deque(maxlen=tail)
        self._lock = threading.Lock()

    def feed(self, line: str) -> None:
        line = line.rstrip("\r\n")
        if not line.strip():
            return
        self.logger.debug("engine: %s", line)
        match = _VLLM_LINE.match(line) or _STD_LINE.match(line) or _PY_WARNING.match(line)
        with self._lock:
            self.tail.append(line)
            if match is None:
                return
            key = (match["level"], match["where"].rsplit("/", 1)[-1])
            kind = self.kinds.get(key)
            if kind is None:
                kind = self.kinds[key] = LogKind(key[0], key[1], match["msg"].strip())
            kind.count += 1

    def follow(self, stream) -> threading.Thread:
        """Read ``stream`` (text lines) in a daemon thread until it closes."""

        def read() -> None:
            for line in stream:
                self.feed(line)

        thread = threading.Thread(target=read, name="engine-log", daemon=True)
        thread.start()
        return thread

    def summary(self) -> list[str]:
        """One line per kind, most frequent first: ``"12x WARNING [where] message"``."""
        with self._lock:
            kinds = sorted(self.kinds.values(), key=lambda k: (-k.count, k.where))
        return [f"{k.count}x {k.level} [{k.where}] {k.first_message[:160]}" for k in kinds]

    def last_lines(self, n: int = 20) -> str:
        with self._lock:
            return "\n".join(list(self.tail)[-n:])

    def log_summary(self, label: str) -> None:
        """Log the summary (one line per kind) and start counting afresh."""
        lines = self.summary()
        if lines:
            total = sum(k.count for k in self.kinds.values())
            self.logger.info("%s: %d warning/error lines of %d kinds", label, total, len(lines))
            for line in lines:
                self.logger.info("%s: %s", label, line)
        with self._lock:
            self.kinds.clear()
