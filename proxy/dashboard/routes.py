"""The dashboard's routes on the gateway's port, under ``dashboard.path`` (docs/dashboard.md).

Pages and their JSON are GET only and need a session; the only POSTs (a static login, logout) carry
a CSRF token from a signed cookie. The routes are public to the gateway's bearer-token middleware:
they authenticate with the session instead. The dashboard reads the database through a connection
of its own, so its heavier queries never hold up the writing of request records.
"""

from __future__ import annotations

import asyncio
import csv
import hmac
import io
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from proxy.core.identity import Authenticator
from proxy.core.state import STATE
from proxy.dashboard import clusters, live, pages, performance, queries
from proxy.dashboard.login import GlobusLogin, LoginFailed, Person, static_login
from proxy.dashboard.session import Cookies, Session
from proxy.records.database import Database, DatabaseUnavailable
from proxy.records.standby_database import StandbyDatabase
from proxy.records.usage_rollups import roll_up, summed_until
from proxy.settings import GatewaySettings

log = logging.getLogger(__name__)

DASHBOARD_ROUTES: Final = frozenset(
    {
        "dashboard",
        "dashboard-page",
        "dashboard-login",
        "dashboard-login-globus",
        "dashboard-callback",
        "dashboard-logout",
        "dashboard-api",
        "dashboard-static",
    }
)
"""Public to the bearer-token middleware: the dashboard checks its own session."""

STATIC: Final = Path(__file__).parent / "static"
_TYPES: Final = {".js": "text/javascript", ".css": "text/css"}
_SECURITY_HEADERS: Final = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self';"
    " img-src 'self' data:;"
    " connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
ROLLUP_EVERY_SECONDS: Final = 300
MAX_DAYS: Final = 731

Page = Callable[[Database, web.Request], Awaitable[dict[str, Any]]]


class Dashboard:
    def __init__(self, settings: GatewaySettings, authenticator: Authenticator) -> None:
        self.settings = settings.dashboard
        self.base = settings.dashboard.path
        self.cookies = Cookies(settings.dashboard, settings.request_log.trusted_proxies)
        self.authenticator = authenticator
        globus = settings.auth.globus if settings.auth.provider == "globus" else None
        self.globus = GlobusLogin(globus, self.settings.admin_groups) if globus is not None else None
        self.database: Database | None = None
        self.static = {
            path.relative_to(STATIC).as_posix(): path.read_bytes()
            for path in STATIC.rglob("*")
            if path.is_file()
        }

    def respond(self, html: str, status: int = 200) -> web.Response:
        return web.Response(text=html, status=status, content_type="text/html", headers=_SECURITY_HEADERS)

    def redirect(self, location: str) -> web.Response:
        return web.Response(status=303, headers={**_SECURITY_HEADERS, "Location": location})

    def redirect_uri(self, request: web.Request) -> str:
        """Registered with Globus for the gateway's client; behind nginx set ``public_url``."""
        origin = self.settings.public_url
        if origin is None:
            scheme = "https" if self.cookies.over_tls(request) else "http"
            origin = f"{scheme}://{request.host}"
        return f"{origin}{self.base}/callback"


DASHBOARD: Final = web.AppKey("dashboard", Dashboard)


def add_dashboard(
    app: web.Application,
    settings: GatewaySettings,
    authenticator: Authenticator,
) -> None:
    """Nothing is added unless the dashboard is enabled. It reads the gateway's state (its metrics,
    and the clusters' job reports through the cache `/jobs` reads too) from `STATE`."""
    if not settings.dashboard.enabled:
        return
    dashboard = Dashboard(settings, authenticator)
    app[DASHBOARD] = dashboard
    base = dashboard.base
    router = app.router
    router.add_get(base, _to_overview, name="dashboard")
    router.add_get(base + "/{page:(|users|user|models|live|batches)}", _page, name="dashboard-page")
    login = router.add_resource(base + "/login", name="dashboard-login")
    login.add_route("GET", _login_form)
    login.add_route("POST", _static_login)
    router.add_get(base + "/login/globus", _globus_login, name="dashboard-login-globus")
    router.add_get(base + "/callback", _callback, name="dashboard-callback")
    router.add_post(base + "/logout", _logout, name="dashboard-logout")
    router.add_get(base + "/api/{name:[a-z_]+}{csv:(\\.csv)?}", _api, name="dashboard-api")
    router.add_get(base + "/static/{file:.+}", _static, name="dashboard-static")
    app.cleanup_ctx.append(_lifecycle(settings))


def _lifecycle(settings: GatewaySettings) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        dashboard = app[DASHBOARD]
        database = await StandbyDatabase.start(settings.database_url, settings.database)
        dashboard.database = database
        rolling = asyncio.create_task(_roll_up_forever(database, dashboard.settings.rollup_delay_seconds))
        try:
            yield
        finally:
            rolling.cancel()
            if dashboard.globus is not None:
                dashboard.globus.close()
            await database.close()

    return lifecycle


async def _roll_up_forever(database: Database, delay: float) -> None:
    while True:
        try:
            await roll_up(database, delay)
        except DatabaseUnavailable:
            pass  # the next round catches up
        except Exception:
            log.exception("dashboard: summing request records failed")
        await asyncio.sleep(ROLLUP_EVERY_SECONDS)


def _same(expected: Any, given: Any) -> bool:
    """A constant-time comparison of a token with what the browser sent (any text, or nothing)."""
    if not isinstance(given, str):
        return False
    return hmac.compare_digest(str(expected).encode(errors="replace"), given.encode(errors="replace"))


# --- pages --------------------------------------------------------------------------------------------


def _days(request: web.Request) -> int:
    try:
        return max(1, min(MAX_DAYS, int(request.query.get("days", "30"))))
    except ValueError:
        return 30


async def _to_overview(request: web.Request) -> web.StreamResponse:
    return request.app[DASHBOARD].redirect(request.app[DASHBOARD].base + "/")


async def _page(request: web.Request) -> web.StreamResponse:
    dashboard = request.app[DASHBOARD]
    session = dashboard.cookies.session(request)
    if session is None:
        return dashboard.redirect(f"{dashboard.base}/login")
    page = request.match_info["page"] or "overview"
    title = next((label for key, _, label in pages.PAGES if key == page), "")
    extra = {}
    if page == "user":
        extra["name"] = request.query.get("name", "")
        title = f"User {extra['name']}"
    html = pages.render(
        dashboard.base, page, title, session.name or session.username, session.csrf, _days(request), extra
    )
    return dashboard.respond(html)


async def _login_form(request: web.Request, message: str = "", status: int = 200) -> web.StreamResponse:
    dashboard = request.app[DASHBOARD]
    if not message and dashboard.cookies.session(request) is not None:
        return dashboard.redirect(dashboard.base + "/")
    if request.query.get("out"):
        message = "You are logged out."
    csrf = secrets.token_urlsafe(24)
    response = dashboard.respond(
        pages.login_page(dashboard.base, globus=dashboard.globus is not None, csrf=csrf, message=message),
        status,
    )
    dashboard.cookies.start_login(request, response, csrf=csrf)
    return response


async def _static_login(request: web.Request) -> web.StreamResponse:
    dashboard = request.app[DASHBOARD]
    if dashboard.globus is not None:
        raise web.HTTPMethodNotAllowed("POST", ["GET"])
    form = await request.post()
    state = dashboard.cookies.login_state(request)
    if state is None or not _same(state.get("csrf"), form.get("csrf")):
        return await _login_form(request, "The login form expired; please try again.", 400)
    person = await static_login(
        dashboard.authenticator, str(form.get("token", "")), dashboard.settings.admin_groups
    )
    if person is None:
        return await _login_form(request, "That token is not valid.", 401)
    return _logged_in(request, person)


def _logged_in(request: web.Request, person: Person) -> web.StreamResponse:
    dashboard = request.app[DASHBOARD]
    if not person.admin:
        log.info("dashboard: %s is not in an admin group; refused", person.username)
        response = dashboard.respond(
            pages.refusal_page(
                dashboard.base, f"{person.username} is not a member of the dashboard's admin groups."
            ),
            403,
        )
        dashboard.cookies.end_login(response)
        return response
    log.info("dashboard: %s logged in", person.username)
    response = dashboard.redirect(dashboard.base + "/")
    dashboard.cookies.end_login(response)
    dashboard.cookies.start_session(request, response, person.username, person.name)
    return response


async def _globus_login(request: web.Request) -> web.StreamResponse:
    dashboard = request.app[DASHBOARD]
    if dashboard.globus is None:
        return dashboard.redirect(dashboard.base + "/login")
    state = secrets.token_urlsafe(24)
    response = dashboard.redirect(dashboard.globus.authorize_url(dashboard.redirect_uri(request), state))
    dashboard.cookies.start_login(request, response, state=state)
    return response


async def _callback(request: web.Request) -> web.StreamResponse:
    dashboard = request.app[DASHBOARD]
    if dashboard.globus is None:
        return dashboard.redirect(dashboard.base + "/login")
    expected = (dashboard.cookies.login_state(request) or {}).get("state")
    state, code = request.query.get("state", ""), request.query.get("code", "")
    if not expected or not _same(expected, state) or not code:
        message = "The login did not complete" + (
            f" (Globus: {request.query['error']})." if "error" in request.query else "; please try again."
        )
        return await _login_form(request, message, 400)
    globus = dashboard.globus
    loop = asyncio.get_running_loop()
    try:
        person = await loop.run_in_executor(
            globus.executor, globus.finish, dashboard.redirect_uri(request), state, code
        )
    except LoginFailed as exc:
        return await _login_form(request, str(exc), 502)
    return _logged_in(request, person)


async def _logout(request: web.Request) -> web.StreamResponse:
    dashboard = request.app[DASHBOARD]
    session = dashboard.cookies.session(request)
    form = await request.post()
    if session is not None and not _same(session.csrf, form.get("csrf")):
        return dashboard.respond(
            pages.refusal_page(dashboard.base, "The logout form expired; reload the page."), 400
        )
    response = dashboard.redirect(dashboard.base + "/login?out=1")
    dashboard.cookies.end_session(response)
    return response


async def _static(request: web.Request) -> web.StreamResponse:
    dashboard = request.app[DASHBOARD]
    name = request.match_info["file"]
    body = dashboard.static.get(name)
    if body is None:
        raise web.HTTPNotFound()
    content_type = _TYPES.get(Path(name).suffix, "application/octet-stream")
    return web.Response(
        body=body,
        content_type=content_type,
        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "max-age=3600"},
    )


# --- JSON and CSV -------------------------------------------------------------------------------------


async def _span(database: Database, request: web.Request) -> queries.Span:
    return queries.Span.last_days(_days(request), time.time(), await summed_until(database))


async def _overview(database: Database, request: web.Request) -> dict[str, Any]:
    return await queries.overview(database, await _span(database, request))


async def _users(database: Database, request: web.Request) -> dict[str, Any]:
    return await queries.users(database, await _span(database, request), request.query.get("q", "")[:100])


async def _user(database: Database, request: web.Request) -> dict[str, Any]:
    return await queries.user_history(database, await _span(database, request), request.query.get("name", ""))


async def _models(database: Database, request: web.Request) -> dict[str, Any]:
    return await performance.performance(database, await _span(database, request))


async def _live(database: Database, request: web.Request) -> dict[str, Any]:
    state = request.app[STATE]
    data = await live.live(database, state.metrics)
    found = await clusters.reports(state.registry, state.jobs)
    data["tables"]["cluster_jobs"] = clusters.model_jobs(found)
    return data


async def _batches(database: Database, request: web.Request) -> dict[str, Any]:
    state = request.app[STATE]
    data = await live.batches(database)
    data["tables"]["cluster_batches"] = clusters.private_batches(
        await clusters.reports(state.registry, state.jobs)
    )
    return data


API: Final[dict[str, Page]] = {
    "overview": _overview,
    "users": _users,
    "user": _user,
    "models": _models,
    "live": _live,
    "batches": _batches,
}


async def _api(request: web.Request) -> web.StreamResponse:
    dashboard = request.app[DASHBOARD]
    session: Session | None = dashboard.cookies.session(request)
    headers = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
    if session is None:
        return web.json_response({"error": "Log in to the dashboard first."}, status=401, headers=headers)
    page = API.get(request.match_info["name"])
    if page is None or dashboard.database is None:
        raise web.HTTPNotFound()
    try:
        data = await page(dashboard.database, request)
    except DatabaseUnavailable:
        return web.json_response(
            {"error": "The database is unavailable; try again shortly."}, status=503, headers=headers
        )
    if not request.match_info["csv"]:
        return web.json_response(data, headers=headers)
    name = request.query.get("table", "")
    table = data.get("tables", {}).get(name)
    if table is None:
        raise web.HTTPNotFound()
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(table["columns"])
    writer.writerows([_spreadsheet_safe(cell) for cell in row] for row in table["rows"])
    filename = f"{request.match_info['name']}-{name}.csv"
    return web.Response(
        text=text.getvalue(),
        content_type="text/csv",
        headers={**headers, "Content-Disposition": f'attachment; filename="{filename}"'},
    )


def _spreadsheet_safe(cell: Any) -> Any:
    """A text cell a spreadsheet would run as a formula (a model name is the client's text) starts
    with an apostrophe instead."""
    if cell is None:
        return ""
    if isinstance(cell, str) and cell[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + cell
    return cell
