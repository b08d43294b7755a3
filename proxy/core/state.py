"""The gateway's state: the one object, under the one application key `STATE`, through which
handlers and middleware reach the gateway's services (`request.app[STATE].limiter`).

It is built once, in proxy/process/app.py, and lives here, in the request core, so that both the
core (dispatch reads the limiter, registry, metrics, retry joins and recorder) and the HTTP edge
(routes, middleware) can read it: it holds only types from the core and the layers below it
(records, metrics, settings). What only one route needs and whose type belongs to a higher layer is
given to that route when it is added instead (the data-staging service, proxy/edge/staging.py), and
what only the process needs stays with the process (the reloader, proxy/process/app.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from proxy.core.body_limits import BodyDeadline, LargeBodies
from proxy.core.callback_relay import Relay
from proxy.core.federation import Federation
from proxy.core.jobs import JobsCache
from proxy.core.limits import Limiter
from proxy.core.maintenance import Maintenance
from proxy.core.recorder import Recorder
from proxy.core.registry import Registry
from proxy.core.retry_join import RetryJoins
from proxy.core.task_book import TaskBook
from proxy.metrics.prometheus import Metrics
from proxy.records.batch_store import BatchStore
from proxy.records.file_store import FileStore, LocalFileStorage
from proxy.records.openai_batch_store import OpenAIBatchStore
from proxy.settings.batches import BatchSettings
from proxy.settings.openai_batches import OpenAIBatchSettings


@dataclass
class GatewayState:
    metrics: Metrics
    recorder: Recorder
    """Makes each request's record, a little after it ends."""
    limiter: Limiter
    """Request rates, requests in flight and tokens, per user and endpoint."""
    registry: Registry
    maintenance: Maintenance
    jobs: JobsCache
    """The clusters' job reports, read by `/jobs`, federation and the adaptors."""
    federation: Federation
    retry_joins: RetryJoins
    relay: Relay
    """Streams whose chunks remote functions POST back to the gateway (proxy/edge/callbacks.py)."""
    tasks: TaskBook
    body_deadline: BodyDeadline
    large_bodies: LargeBodies
    batch_settings: BatchSettings
    openai_batch_settings: OpenAIBatchSettings
    file_storage: LocalFileStorage
    """The bytes of uploaded and result files (OpenAI's Files API)."""
    base_path: str
    started_at: int
    """When this process started (Unix time), the `created` of the models it lists."""
    batches: BatchStore | None = None
    """Set by the database's lifecycle, which runs before the gateway serves its first request."""
    files: FileStore | None = None
    """Set with `batches`, as are `openai_batches`."""
    openai_batches: OpenAIBatchStore | None = None


STATE = web.AppKey("state", GatewayState)
