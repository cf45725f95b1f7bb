"""The Prefect flows (the pipeline and one per stage) and the ``cot2align`` command line.

Importing this package before Prefect configures its logging routes the project's own loggers
(``cot2align``: stage and store messages; ``cot2align_core``: training, generation) through
Prefect's handlers, so that they reach the console and the run's logs in the UI; when stderr
is not a terminal, progress bars are off (a log gets one line per event, not redraws).
"""
import os
import sys

if not sys.stderr.isatty():  # a log file or a worker: no progress-bar redraws in it
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' bars too

# Outside a flow run (tests, notebooks) these loggers log to the console only, silently.
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

_OURS = ("cot2align", "cot2align_core")
_extra = [x for x in os.environ.get("PREFECT_LOGGING_EXTRA_LOGGERS", "").split(",") if x]
os.environ["PREFECT_LOGGING_EXTRA_LOGGERS"] = ",".join(_extra + [x for x in _OURS if x not in _extra])

import logging  # noqa: E402

for _name in _OURS:  # Prefect attaches its handlers; the loggers' own level lets INFO through
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(logging.INFO)
