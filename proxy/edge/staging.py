"""`PUT /data/staging`: the caller's staging folder on the gateway's Globus guest collection, with a
read-write access rule for them, so that they can move data in and out with Globus Transfer (the
existing command-line client calls it before every stage-in and stage-out).

Idempotent: an existing folder is kept, and so is an existing rule (made read-write if it was not).
Two calls at once for one user share one preparation here; calls racing from other processes meet
Transfer's own conflicts (the folder or the rule exists), which count as success. The SDK is
synchronous: its calls run in a small pool of their own, under one deadline.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import globus_sdk
from aiohttp import web
from globus_sdk.transport import RequestsTransport, RetryConfig
from pydantic import BaseModel

from proxy.core.identity import USER
from proxy.errors import ApiError
from proxy.settings.staging import DataStagingSettings

log = logging.getLogger(__name__)

MKDIR_EXISTS = "ExternalError.MkdirFailed.Exists"
RULE_EXISTS = "Exists"
THREADS = 4
MAX_PREPARING = 64
"""Users being prepared at once; beyond, 503 rather than a queue that outgrows every deadline."""


class StagingArea(BaseModel):
    collection_id: str
    path: str
    acl_rule_id: str
    principal: str


class Stager:
    def __init__(
        self, settings: DataStagingSettings, collection_id: str, max_preparing: int = MAX_PREPARING
    ) -> None:
        self._settings = settings
        self._max_preparing = max_preparing
        self._collection = collection_id
        self._client: globus_sdk.TransferClient | None = None
        self._pool = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="transfer")
        self._preparing: dict[str, asyncio.Future[StagingArea]] = {}

    async def prepare(self, principal: str) -> StagingArea:
        future = self._preparing.get(principal)
        if future is None:
            if len(self._preparing) >= self._max_preparing:
                raise StagingFailed("too many preparations at once")
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(self._pool, self._prepare, principal)
            self._preparing[principal] = future
            future.add_done_callback(lambda _: self._preparing.pop(principal, None))
        return await asyncio.wait_for(asyncio.shield(future), self._settings.timeout_seconds)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _prepare(self, principal: str) -> StagingArea:
        client = self._transfer()
        path = f"{self._settings.root}{principal}/"
        try:
            client.operation_mkdir(self._collection, path)
        except globus_sdk.TransferAPIError as exc:
            if exc.code != MKDIR_EXISTS:
                raise
        rule = self._rule(client, principal, path)
        if rule is None:
            try:
                created = client.add_endpoint_acl_rule(
                    self._collection,
                    {
                        "DATA_TYPE": "access",
                        "principal_type": "identity",
                        "principal": principal,
                        "path": path,
                        "permissions": "rw",
                    },
                )
                return self._area(principal, path, created["access_id"])
            except globus_sdk.TransferAPIError as exc:
                if exc.code != RULE_EXISTS:
                    raise
            rule = self._rule(client, principal, path)
            if rule is None:
                raise StagingFailed("Globus Transfer reports an access rule that it does not list.")
        if rule.get("permissions") != "rw":
            client.update_endpoint_acl_rule(
                self._collection, rule["id"], {"DATA_TYPE": "access", "permissions": "rw"}
            )
        return self._area(principal, path, rule["id"])

    def _rule(self, client: globus_sdk.TransferClient, principal: str, path: str) -> dict[str, Any] | None:
        for rule in client.endpoint_acl_list(self._collection):
            if rule.get("principal") == principal and rule.get("path") == path:
                return dict(rule)
        return None

    def _area(self, principal: str, path: str, rule_id: Any) -> StagingArea:
        return StagingArea(
            collection_id=self._collection, path=path, acl_rule_id=str(rule_id), principal=principal
        )

    def _transfer(self) -> globus_sdk.TransferClient:
        """Built on first use, in a pool thread: the authorizer asks Globus Auth for a token."""
        if self._client is None:
            client_id, secret = self._settings.credentials()
            transport = RequestsTransport(http_timeout=self._settings.timeout_seconds)
            auth = globus_sdk.ConfidentialAppAuthClient(
                client_id,
                secret,
                base_url=self._settings.auth_url,
                transport=transport,
                retry_config=_retries(),
            )
            authorizer = globus_sdk.ClientCredentialsAuthorizer(auth, globus_sdk.TransferClient.scopes.all)
            self._client = globus_sdk.TransferClient(
                base_url=self._settings.transfer_url,
                authorizer=authorizer,
                transport=transport,
                retry_config=_retries(),
            )
        return self._client


def _retries() -> RetryConfig:
    """One each: a client adds its service's checks to the config it is given, and Auth's would
    retry what Transfer's leave alone (its 502 `ExternalError`s, such as a folder that exists)."""
    return RetryConfig(max_retries=1, max_sleep=1)


class StagingFailed(Exception):
    """No preparation now: too many at once, or Transfer answered something that makes no sense
    for the steps taken."""


def add_staging_routes(app: web.Application, base_path: str, settings: DataStagingSettings) -> None:
    """The route exists either way, so that a gateway without staging says so instead of 404. Its
    stager is given to it here rather than kept in the gateway's state: nothing else uses it."""
    stager = None
    if settings.collection_id is not None:
        stager = configured = Stager(settings, settings.collection_id)

        async def close(_: web.Application) -> None:
            configured.close()

        app.on_cleanup.append(close)

    async def staging(request: web.Request) -> web.Response:
        return await stage(request, stager)

    app.router.add_put(f"{base_path}/data/staging", staging)


async def stage(request: web.Request, stager: Stager | None) -> web.Response:
    if stager is None:
        raise ApiError(404, "Data staging is not configured on this gateway.", code="staging_not_configured")
    principal = request[USER].id
    try:
        principal = str(uuid.UUID(principal))
    except ValueError:
        raise ApiError(403, "Data staging needs a Globus identity.", code="permission_denied") from None
    try:
        area = await stager.prepare(principal)
    except TimeoutError:
        raise ApiError(504, "Globus Transfer did not answer in time.", code="staging_timeout") from None
    except globus_sdk.TransferAPIError as exc:
        raise _transfer_refused(exc) from None
    except globus_sdk.AuthAPIError as exc:
        log.error("data staging: Globus Auth refused the gateway's credentials (%s)", exc.http_status)
        raise ApiError(
            503, "Data staging is misconfigured on the gateway.", code="staging_unavailable"
        ) from None
    except (globus_sdk.NetworkError, StagingFailed) as exc:
        log.warning("data staging failed: %s", type(exc).__name__)
        raise ApiError(
            503, "Globus Transfer is unavailable; try again shortly.", code="staging_unavailable"
        ) from None
    return web.json_response(area.model_dump())


def _transfer_refused(exc: globus_sdk.TransferAPIError) -> ApiError:
    """The gateway's own credentials or rights are not the caller's fault: 503, logged for operators."""
    log.error("data staging: Globus Transfer answered %s %s", exc.http_status, exc.code)
    if exc.http_status in (401, 403, 404):
        return ApiError(503, "Data staging is misconfigured on the gateway.", code="staging_unavailable")
    if exc.http_status in (429, 503):
        return ApiError(503, "Globus Transfer is busy; try again shortly.", code="staging_unavailable")
    return ApiError(
        502, f"Globus Transfer could not prepare the staging folder ({exc.code}).", code="staging_failed"
    )
