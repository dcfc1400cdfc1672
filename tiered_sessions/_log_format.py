"""How the command line logs: text for people, or one JSON object per line for log shippers
(``--log-format json`` or ``TIERED_SESSIONS_LOG_FORMAT=json``). Either way one line per event: a traceback
goes into the JSON object's ``exception`` field."""

from __future__ import annotations

import datetime
import logging
import sys

import orjson

FORMATS = ("text", "json")
ENV = "TIERED_SESSIONS_LOG_FORMAT"
_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def configure(log_format: str, verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(_TEXT))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True)
