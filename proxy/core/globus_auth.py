"""The `globus` auth provider: Globus Auth token introspection, sessions, policies and groups.

The decisions (`identify`, `group_gate`) are plain functions of the introspection document, so they
read like the rules they enforce. The SDK is synchronous: every call runs in a dedicated, bounded
thread pool, never on the event loop, and its outcome is cached by token hash.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import globus_sdk
from globus_sdk.transport import RequestsTransport, RetryConfig

from proxy.core.auth_cache import RedisStore, TokenCache, token_key
from proxy.core.auth_guard import AddressGuard, Busy, CallQueue, TooManyTokens, retry_after
from proxy.core.identity import ClientAddress, User, unauthorized
from proxy.errors import ApiError
from proxy.metrics.prometheus import Metrics
from proxy.settings.auth import GlobusAuthSettings
from proxy.settings.files import ConfigError

log = logging.getLogger(__name__)

GROUPS_RESOURCE_SERVER = "groups.api.globus.org"
GROUPS_SCOPE = "urn:globus:auth:scope:groups.api.globus.org:view_my_groups_and_memberships"
RELOGIN = (
    "Log out at https://app.globus.org/logout, then authenticate again "
    "(e.g. 'python3 inference_auth_token.py authenticate --force')."
)

UNREACHABLE = "Globus Auth cannot be reached to check your token; try again shortly."
BUSY = "The gateway is checking too many new tokens; try again shortly."
NO_GROUPS_SCOPE = "The gateway cannot read Globus group memberships; tell its administrators."

Result = TypeVar("Result")


@dataclass(frozen=True)
class Refusal:
    """A token that will not do; cached briefly so a bad token does not hammer Globus."""

    status: int
    message: str


class GlobusUnavailable(Exception):
    """Globus could not answer (down, slow, or the gateway is misconfigured): not the user's fault."""


def identify(doc: Mapping[str, Any], settings: GlobusAuthSettings, now: float) -> User | Refusal:
    """Who the token belongs to, following the existing gateway's rules, before groups are known."""
    if doc.get("active") is not True:
        return Refusal(401, "The access token is not active (expired, revoked or unknown); get a new one.")
    if float(doc.get("exp", 0)) <= now:
        return Refusal(401, "The access token has expired; get a new one.")
    if settings.scope not in str(doc.get("scope", "")).split():
        return Refusal(401, "The access token was not issued for this gateway; request the gateway's scope.")
    username = str(doc.get("username", ""))
    if username in settings.service_usernames:
        return _service_account(doc)
    user = _session_user(doc, settings)
    if isinstance(user, Refusal) or not settings.policies:
        return user
    return _policy_refusal(doc, settings) or user


def _service_account(doc: Mapping[str, Any]) -> User:
    username = str(doc["username"])
    return User(
        id=str(doc.get("sub") or doc.get("client_id", "")),
        username=username,
        name=str(doc.get("name") or ""),
        idp_id=username.rpartition("@")[2],
        idp_name=str(doc.get("iss", "")),
        auth_service="globus",
    )


def _session_user(doc: Mapping[str, Any], settings: GlobusAuthSettings) -> User | Refusal:
    """The first identity with a live session whose domain is authorized."""
    identities = [i for i in doc.get("identity_set_detail") or [] if isinstance(i, dict)]
    authentications = (doc.get("session_info") or {}).get("authentications") or {}
    session_identities = []
    for session in authentications.values():
        identity = next((i for i in identities if i.get("identity_provider") == session.get("idp")), None)
        if identity is None:
            continue
        session_identities.append(identity)
        username = str(identity.get("username", ""))
        if username.rpartition("@")[2] in settings.authorized_idp_domains and not _suspicious(username):
            return User(
                id=str(identity.get("sub", "")),
                username=username,
                name=str(identity.get("name") or ""),
                idp_id=str(identity.get("identity_provider", "")),
                idp_name=str(identity.get("identity_provider_display_name") or ""),
                auth_service="globus",
            )
    current = ", ".join(f"{i.get('name') or '?'} ({i.get('username')})" for i in session_identities)
    return Refusal(
        401,
        f"You must authenticate with an identity from {', '.join(settings.authorized_idp_domains)}. "
        f"Currently authenticated as {current or 'nobody (no active session)'}. {RELOGIN}",
    )


def _suspicious(username: str) -> bool:
    return "<" in username or ">" in username


def _policy_refusal(doc: Mapping[str, Any], settings: GlobusAuthSettings) -> Refusal | None:
    evaluations = doc.get("policy_evaluations") or {}
    passed = all(
        isinstance(evaluations.get(policy), dict) and evaluations[policy].get("evaluation") is True
        for policy in settings.policies
    )
    if passed:
        return None
    return Refusal(
        401,
        "Your session does not meet the gateway's authentication policy, most likely a "
        f"high-assurance timeout. {RELOGIN} Use an identity from "
        f"{', '.join(settings.authorized_idp_domains)}.",
    )


def group_gate(user: User, settings: GlobusAuthSettings) -> Refusal | None:
    """The gateway-wide gates: groups required for the user's identity provider, then any-of groups."""
    required_for_idp = settings.groups_per_idp.get(user.domain)
    if required_for_idp and user.groups.isdisjoint(required_for_idp):
        return Refusal(403, f"{user.username} is not in a Globus group allowed for {user.domain} users.")
    if settings.groups and user.groups.isdisjoint(settings.groups):
        return Refusal(403, f"{user.username} is not a member of a Globus group allowed on this gateway.")
    return None


class OutcomeCodec:
    """Serializes cached outcomes for the shared (Redis) cache."""

    def encode(self, value: User | Refusal) -> bytes:
        if isinstance(value, Refusal):
            return json.dumps({"refusal": asdict(value)}).encode()
        return json.dumps({"user": {**asdict(value), "groups": sorted(value.groups)}}).encode()

    def decode(self, data: bytes) -> User | Refusal:
        document = json.loads(data)
        if "refusal" in document:
            return Refusal(**document["refusal"])
        fields = document["user"]
        return User(**{**fields, "groups": frozenset(fields["groups"])})


class GlobusAuthenticator:
    def __init__(self, settings: GlobusAuthSettings, redis_url: str | None = None) -> None:
        self._settings = settings
        self._executor = ThreadPoolExecutor(max_workers=settings.threads, thread_name_prefix="globus")
        self._queue = CallQueue(settings.threads, settings.queue_size, settings.queue_wait_seconds)
        self._guard = AddressGuard(
            settings.unseen_tokens_per_minute,
            settings.unseen_tokens_burst,
            settings.refused_tokens_per_minute,
            settings.refused_tokens_burst,
            good_seconds=settings.cache_seconds,
        )
        self._metrics: Metrics | None = None
        self._local = threading.local()
        store = RedisStore(redis_url) if redis_url else None
        self._cache: TokenCache[User | Refusal] = TokenCache(
            settings.cache_size, store, OutcomeCodec() if store else None
        )

    def instrument(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def authenticate(self, token: str, client: ClientAddress) -> User:
        introspected = False

        async def introspect() -> tuple[User | Refusal, float]:
            """Only for tokens the cache has not seen: the client's address pays for it first."""
            nonlocal introspected
            address = client()
            good_address = self._guard.admit(address)
            introspected, started = True, time.monotonic()
            try:
                outcome = await self._resolve(token, good_address)
            finally:
                if self._metrics is not None:
                    self._metrics.introspection_seconds.observe(time.monotonic() - started)
            self._guard.outcome(address, isinstance(outcome[0], User))
            return outcome

        try:
            outcome = await self._cache.get(token_key(token), introspect)
        except GlobusUnavailable as exc:
            raise ApiError(503, str(exc), code="auth_unavailable") from None
        except Busy:
            raise ApiError(503, BUSY, code="auth_busy", headers={"Retry-After": "1"}) from None
        except TooManyTokens as exc:
            headers = {"Retry-After": retry_after(exc.retry_after)}
            raise ApiError(429, exc.message, code="rate_limit_exceeded", headers=headers) from None
        finally:
            if self._metrics is not None:
                self._metrics.auth_cache.labels("miss" if introspected else "hit").inc()
        if isinstance(outcome, User):
            return outcome
        if outcome.status == 401:
            raise unauthorized(outcome.message)
        raise ApiError(outcome.status, outcome.message, code="permission_denied")

    async def close(self) -> None:
        await self._cache.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _resolve(self, token: str, priority: bool) -> tuple[User | Refusal, float]:
        doc = await self._call(self._introspect, token, priority)
        now = time.time()
        identity = identify(doc, self._settings, now)
        if isinstance(identity, Refusal):
            return identity, self._settings.refusal_cache_seconds
        groups = await self._call(self._groups, token, priority=True)  # the token is active
        user = User(**{**asdict(identity), "groups": frozenset(groups)})
        refusal = group_gate(user, self._settings)
        if refusal is not None:
            return refusal, self._settings.refusal_cache_seconds
        return user, min(self._settings.cache_seconds, float(doc["exp"]) - now)

    async def _call(self, function: Callable[[str], Result], token: str, priority: bool) -> Result:
        """The wait for a thread is bounded on its own (`queue_wait_seconds`, then 503); the time
        budget of the call starts in the thread."""
        settings = self._settings
        budget = 2 * settings.timeout_seconds * (settings.retries + 1) + 1
        try:
            return await self._queue.run(self._executor, function, token, priority=priority, budget=budget)
        except (TimeoutError, globus_sdk.NetworkError) as exc:
            log.warning("Globus did not answer: %s", type(exc).__name__)
            raise GlobusUnavailable(UNREACHABLE) from None
        except globus_sdk.GlobusAPIError as exc:
            if exc.http_status == 401:
                log.error("configuration error: Globus refused the gateway's client credentials (HTTP 401)")
            else:
                log.warning("Globus answered HTTP %s", exc.http_status)
            raise GlobusUnavailable("Globus Auth could not check your token; try again shortly.") from None

    def _auth_client(self) -> globus_sdk.ConfidentialAppAuthClient:
        """One client per worker thread: the SDK's HTTP session is not shared between threads."""
        client = getattr(self._local, "auth", None)
        if client is None:
            client = globus_sdk.ConfidentialAppAuthClient(
                self._settings.client_id,
                self._settings.client_secret,
                base_url=self._settings.auth_url,
                transport=RequestsTransport(http_timeout=self._settings.timeout_seconds),
                retry_config=_retry_config(self._settings),
            )
            self._local.auth = client
        return client

    def _introspect(self, token: str) -> dict[str, Any]:
        form = {"token": token, "include": "identity_set_detail,session_info"}
        if self._settings.policies:
            form["authentication_policies"] = ",".join(self._settings.policies)
        response = self._auth_client().post("/v2/oauth2/token/introspect", data=form, encoding="form")
        return dict(response.data) if isinstance(response.data, dict) else {}

    def _groups(self, token: str) -> list[str]:
        dependent = self._auth_client().oauth2_get_dependent_tokens(token, scope=GROUPS_SCOPE)
        groups_token = dependent.by_resource_server.get(GROUPS_RESOURCE_SERVER)
        if groups_token is None:
            log.error(
                "configuration error: the gateway's scope %s has no Groups dependent scope "
                "(%s); add it to the scope in Globus Auth",
                self._settings.scope,
                GROUPS_SCOPE,
            )
            raise GlobusUnavailable(NO_GROUPS_SCOPE)
        groups = globus_sdk.GroupsClient(
            base_url=self._settings.groups_url,
            authorizer=globus_sdk.AccessTokenAuthorizer(groups_token["access_token"]),
            transport=RequestsTransport(http_timeout=self._settings.timeout_seconds),
            retry_config=_retry_config(self._settings),
        ).get_my_groups(statuses="active")
        return [str(group["id"]) for group in groups]

    def verify_policies(self) -> None:
        """As the existing gateway does at start-up: each policy is high assurance and covers
        exactly the authorized domains. Blocking; call before serving."""
        for policy_id in self._settings.policies:
            try:
                policy = self._auth_client().get(f"/v2/api/policies/{policy_id}").data["policy"]
            except (globus_sdk.GlobusError, KeyError, TypeError) as exc:
                raise ConfigError(
                    f"auth.globus.policies: cannot read policy {policy_id} from Globus Auth "
                    f"({type(exc).__name__}); set verify_policies_at_startup: false to start anyway"
                ) from None
            check_policy(policy_id, policy, self._settings)


def check_policy(policy_id: str, policy: Mapping[str, Any], settings: GlobusAuthSettings) -> None:
    if policy.get("high_assurance") is not True:
        raise ConfigError(f"auth.globus.policies: policy {policy_id} is not high assurance")
    domains = set(policy.get("domain_constraints_include") or [])
    if domains != set(settings.authorized_idp_domains):
        raise ConfigError(
            f"auth.globus.policies: policy {policy_id} allows domains {sorted(domains)} but "
            f"authorized_idp_domains is {sorted(settings.authorized_idp_domains)}"
        )


def _retry_config(settings: GlobusAuthSettings) -> RetryConfig:
    return RetryConfig(max_retries=settings.retries, max_sleep=1)
