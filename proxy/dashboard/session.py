"""Signed cookies: the dashboard's login session, and the short-lived state of a login in progress.

Nothing is kept on the server, so every gateway process accepts a session another one issued (they
share ``session_secret``). A value is ``base64(json).base64(hmac)``, the HMAC keyed per purpose, so a
login-state cookie can never be replayed as a session. Each session carries its own CSRF token, which
every POST (logout) must echo in its form.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import secrets
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Final, Literal

from aiohttp import web

from proxy.settings.dashboard import DashboardSettings

SESSION_COOKIE: Final = "gateway_dashboard"
LOGIN_COOKIE: Final = "gateway_dashboard_login"
LOGIN_SECONDS: Final = 600
"""How long the Globus login page may take before its state expires."""

Purpose = Literal["session", "login"]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Signer:
    def __init__(self, secret: str) -> None:
        self._key = hashlib.sha256(b"inference-gateway dashboard\0" + secret.encode()).digest()

    def _mac(self, purpose: Purpose, body: str) -> str:
        message = f"{purpose}\0{body}".encode(errors="replace")
        return _b64(hmac.new(self._key, message, hashlib.sha256).digest())

    def sign(self, purpose: Purpose, payload: dict[str, Any]) -> str:
        body = _b64(json.dumps(payload, separators=(",", ":")).encode())
        return f"{body}.{self._mac(purpose, body)}"

    def unsign(self, purpose: Purpose, value: str | None, now: float | None = None) -> dict[str, Any] | None:
        """The payload, or None when the value is missing, forged, of another purpose or expired."""
        if not value or value.count(".") != 1:
            return None
        body, mac = value.split(".")
        if not hmac.compare_digest(mac.encode(errors="replace"), self._mac(purpose, body).encode()):
            return None
        try:
            payload = json.loads(_unb64(body))
        except (ValueError, binascii.Error):
            return None
        if not isinstance(payload, dict):
            return None
        expires = payload.get("exp")
        if not isinstance(expires, int | float) or expires <= (time.time() if now is None else now):
            return None
        return dict(payload)


@dataclass(frozen=True)
class Session:
    username: str
    name: str
    csrf: str


class Cookies:
    """Reads and writes the dashboard's cookies with the configured flags."""

    def __init__(self, settings: DashboardSettings, trusted_proxies: Collection[str]) -> None:
        assert settings.session_secret is not None  # the settings refuse an enabled dashboard without
        self.signer = Signer(settings.session_secret)
        self._settings = settings
        self._trusted = [ipaddress.ip_network(network, strict=False) for network in trusted_proxies]

    def session(self, request: web.Request) -> Session | None:
        payload = self.signer.unsign("session", request.cookies.get(SESSION_COOKIE))
        if payload is None:
            return None
        return Session(str(payload.get("u", "")), str(payload.get("n", "")), str(payload.get("c", "")))

    def start_session(
        self, request: web.Request, response: web.StreamResponse, username: str, name: str
    ) -> None:
        expires = int(time.time() + self._settings.session_hours * 3600)
        value = self.signer.sign(
            "session", {"u": username, "n": name, "c": secrets.token_urlsafe(24), "exp": expires}
        )
        self._set(request, response, SESSION_COOKIE, value, self._settings.cookie_samesite)

    def end_session(self, response: web.StreamResponse) -> None:
        response.del_cookie(SESSION_COOKIE, path=self._settings.path)

    def login_state(self, request: web.Request) -> dict[str, Any] | None:
        return self.signer.unsign("login", request.cookies.get(LOGIN_COOKIE))

    def start_login(self, request: web.Request, response: web.StreamResponse, **state: str) -> None:
        """Lax even when sessions are Strict: Globus sends the browser back with a cross-site GET."""
        value = self.signer.sign("login", {**state, "exp": int(time.time()) + LOGIN_SECONDS})
        self._set(request, response, LOGIN_COOKIE, value, "Lax", max_age=LOGIN_SECONDS)

    def end_login(self, response: web.StreamResponse) -> None:
        response.del_cookie(LOGIN_COOKIE, path=self._settings.path)

    def over_tls(self, request: web.Request) -> bool:
        """TLS to the gateway itself, or to nginx in front of it (its X-Forwarded-Proto, believed only
        from the trusted proxies)."""
        if request.secure:
            return True
        peer = request.remote
        if not peer or request.headers.get("X-Forwarded-Proto", "").lower() != "https":
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in network for network in self._trusted)

    def _set(
        self,
        request: web.Request,
        response: web.StreamResponse,
        name: str,
        value: str,
        samesite: str,
        max_age: int | None = None,
    ) -> None:
        mode = self._settings.cookie_secure
        secure = mode == "always" or (mode == "auto" and self.over_tls(request))
        response.set_cookie(
            name,
            value,
            path=self._settings.path,
            httponly=True,
            secure=secure,
            samesite=samesite,
            max_age=max_age if max_age is not None else int(self._settings.session_hours * 3600),
        )
