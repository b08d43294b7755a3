"""Database calls of the batch and file routes, whose outages and timeouts the client reads as
"try again shortly" (a 503 with Retry-After), never as a 500."""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import TypeVar

from proxy.errors import ApiError
from proxy.records.database import DatabaseTimeout, DatabaseUnavailable

log = logging.getLogger(__name__)
Result = TypeVar("Result")

RETRY_AFTER_SECONDS = 5


async def store_call(call: Awaitable[Result]) -> Result:
    """The database's outages and timeouts are the client's "try again shortly", never a 500."""
    retry = {"Retry-After": str(RETRY_AFTER_SECONDS)}
    try:
        return await call
    except DatabaseTimeout as exc:
        log.warning("batch database: %s", exc)
        message = "The batch database did not answer in time (it may be busy); try again shortly."
        raise ApiError(503, message, code="database_timeout", headers=retry) from None
    except DatabaseUnavailable:
        message = "The batch database is unavailable; try again shortly."
        raise ApiError(503, message, code="database_unavailable", headers=retry) from None
