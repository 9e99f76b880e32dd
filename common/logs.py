"""Structured JSON logs: one object per line, with the fields a record carries in `extra`.

A record with `extra={PREFORMATTED: True}` already holds JSON lines (the request log, made per
request and handed over in batches by the ledger): written as they are."""
from __future__ import annotations

import logging
import sys
import time

import orjson

PREFORMATTED = "cborg_json_lines"
_STD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName", "color_message"}


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if record.__dict__.get(PREFORMATTED):
            return record.getMessage()
        d = {"ts": round(record.created, 3), "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
             "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        for k, v in record.__dict__.items():
            if k not in _STD and not k.startswith("_"):
                d[k] = v
        if record.exc_info:
            d["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(d, default=str).decode()


def setup_logging(level: str = "info", stream=None) -> None:
    h = logging.StreamHandler(stream or sys.stderr)
    h.setFormatter(JSONFormatter())
    root = logging.getLogger()
    root.handlers[:] = [h]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    logging.getLogger("uvicorn.access").disabled = True
    # Request lines are switched by CBORG_REQUEST_LOGS, not by the level: they stay at --log-level warning.
    logging.getLogger("cborg.request").setLevel(logging.INFO)
