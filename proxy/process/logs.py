"""The gateway's own log (stderr): its format, and what it must never contain.

aiohttp logs a request it cannot parse with the offending bytes in the message and a traceback.
Those bytes may be a header line carrying a bearer token, and anyone can send such requests, many
a second. Each becomes one short warning instead: who sent it and what kind of error, nothing of
what was sent.

With `--log-format json` (or GATEWAY_LOG_FORMAT=json) every line the gateway writes is one JSON
object, so `journalctl -o cat | jq` reads the whole journal: request records (stdout, JSON anyway),
log records of the gateway, aiohttp and the libraries, warnings, uncaught exceptions, and the
command line's own messages (a configuration error, a busy port).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import traceback
from datetime import UTC, datetime
from types import TracebackType
from typing import Final, Literal

from aiohttp.http_exceptions import HttpProcessingError

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FORMAT_ENV: Final = "GATEWAY_LOG_FORMAT"
LogFormat = Literal["text", "json"]


class MalformedRequests(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            sender = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.msg = "refused a malformed request from %s: %s (HTTP %d)"
            record.args = (sender, type(error).__name__, error.code)
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class JsonFormatter(logging.Formatter):
    """One object per record, on one line: a multi-line message or a traceback is a JSON string."""

    def format(self, record: logging.LogRecord) -> str:
        document = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, ensure_ascii=False)


def default_format() -> LogFormat:
    return "json" if os.environ.get(LOG_FORMAT_ENV, "").strip().lower() == "json" else "text"


def configure_logging(log_format: LogFormat = "text") -> None:
    """Also sets the environment variable, so workers and any child process log alike."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
        _route_python_messages()
    else:
        handler.setFormatter(logging.Formatter(FORMAT))
    os.environ[LOG_FORMAT_ENV] = log_format
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    logging.getLogger("aiohttp.server").addFilter(MalformedRequests())


def _route_python_messages() -> None:
    """What Python itself would print as text: warnings, uncaught exceptions (main thread, other
    threads) and exceptions it can only ignore (in __del__, at exit) become log records."""
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_thread_exception
    sys.unraisablehook = _log_unraisable


def _log_uncaught(kind: type[BaseException], error: BaseException, trace: TracebackType | None) -> None:
    logging.getLogger("proxy").critical("uncaught exception", exc_info=(kind, error, trace))


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None:
        return
    thread = args.thread.name if args.thread is not None else "?"
    logging.getLogger("proxy").error(
        "uncaught exception in thread %s",
        thread,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )


def _log_unraisable(unraisable: sys.UnraisableHookArgs) -> None:
    error = unraisable.exc_value
    trace = "".join(traceback.format_exception(error)) if error is not None else ""
    logging.getLogger("proxy").warning(
        "%s %r: %s", unraisable.err_msg or "exception ignored in", unraisable.object, trace
    )
