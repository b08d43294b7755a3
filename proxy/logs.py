"""The gateway's own log (stderr): what it must never contain.

aiohttp logs a request it cannot parse with the offending bytes in the message and a traceback.
Those bytes may be a header line carrying a bearer token, and anyone can send such requests, many
a second. Each becomes one short warning instead: who sent it and what kind of error, nothing of
what was sent.
"""

from __future__ import annotations

import logging

from aiohttp.http_exceptions import HttpProcessingError

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format=FORMAT)
    logging.getLogger("aiohttp.server").addFilter(MalformedRequests())
