"""The usage dashboard in a real headless Chromium (Debian's, driven by Playwright): a Globus login
through the fake Globus Auth with the real globus-sdk (authorization code flow), every page, the
numbers of records the test inserted, a non-admin refused, CSV export, logout; and the static token
form of the embedded default.

With GATEWAY_DASHBOARD_SCREENSHOTS=1 the pages are also saved as docs/dashboard-*.png.
"""

from __future__ import annotations

import csv
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from playwright.async_api import Browser, Page, async_playwright, expect

from proxy.records import schema
from proxy.records.usage_rollups import roll_up
from testing.fake_globus.auth import FakeGlobus
from testing.fake_globus.identities import FakeUser
from tests.dashboard_records import insert, insert_batches, records
from tests.support import Server, start_gateway, write_gateway_config

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ADMINS = "9a9a9a9a-0000-4000-8000-00000000a0a0"
ADMIN = FakeUser.single("dana@uni.edu", name="Dana Admin", groups=[ADMINS])
STRANGER = FakeUser.single("eve@uni.edu", name="Eve", groups=["other-group"])
SECRET = "test-session-secret-0123456789abcdef"
SCREENSHOTS = os.environ.get("GATEWAY_DASHBOARD_SCREENSHOTS") == "1"

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM) and not os.environ.get("CI"), reason="Debian's chromium is not installed"
)


def dashboard_config(directory: Path, backend: Server, globus: FakeGlobus | None) -> Path:
    path = write_gateway_config(directory, backend.url)
    document: dict[str, Any] = yaml.safe_load(path.read_text())
    document["database_url"] = f"sqlite:///{directory / 'gateway.db'}"
    admin_groups = [ADMINS]
    if globus is not None:
        document["auth"] = {
            "provider": "globus",
            "globus": {
                "client_id": globus.client_id,
                "client_secret": globus.client_secret,
                "scope": globus.scope,
                "authorized_idp_domains": ["uni.edu"],
                "auth_url": globus.auth_url,
                "groups_url": globus.groups_url,
                "timeout_seconds": 5,
                "retries": 0,
            },
        }
    else:
        tokens = yaml.safe_load((directory / "tokens.yaml").read_text())
        tokens["tokens"].append(
            {
                "token": "admin-token-0001",
                "user": {"id": "adm", "username": "root@example.org", "groups": [ADMINS]},
            }
        )
        (directory / "tokens.yaml").write_text(yaml.safe_dump(tokens))
    document["dashboard"] = {"enabled": True, "admin_groups": admin_groups, "session_secret": SECRET}
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        await launched.close()


async def seeded_gateway(directory: Path, backend: Server, globus: FakeGlobus | None) -> tuple[Any, str]:
    """A gateway with a dashboard, and records in its database: some summed, some still raw."""
    runner, server = await start_gateway(dashboard_config(directory, backend, globus))
    now = time.time()
    rows, _ = records(now)
    database = await schema.connect(f"sqlite:///{directory / 'gateway.db'}")
    try:
        await insert(database, rows)
        await roll_up(database, delay=3600, now=now)
        await insert_batches(database, now)
    finally:
        await database.close()
    return runner, server.url.removesuffix("/resource_server")


async def shot(page: Page, name: str) -> None:
    if SCREENSHOTS:
        await page.wait_for_timeout(300)  # the charts' last frame
        await page.screenshot(path=str(ROOT / "docs" / f"dashboard-{name}.png"), full_page=True)


async def value(page: Page, selector: str) -> str:
    return await page.locator(selector).first.get_attribute("data-value") or ""


async def test_globus_admin_sees_every_page_with_the_inserted_numbers(
    browser: Browser, backend: Server, globus: FakeGlobus, tmp_path: Path
) -> None:
    runner, origin = await seeded_gateway(tmp_path, backend, globus)
    globus.web_logins.redirect_uris.add(f"{origin}/dashboard/callback")
    globus.web_logins.signed_in = ADMIN
    _, expected = records(time.time())
    try:
        context = await browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        page = await context.new_page()
        await page.goto(f"{origin}/dashboard/?days=7")
        await expect(page).to_have_url(f"{origin}/dashboard/login")
        await shot(page, "login")
        await page.get_by_role("link", name="Log in with Globus").click()
        await expect(page).to_have_url(f"{origin}/dashboard/")
        exchanges = [r for r in globus.requests if r.path == "/auth/v2/oauth2/token"]
        assert exchanges[-1].form["grant_type"] == "authorization_code"
        assert exchanges[-1].basic_credentials == (globus.client_id, globus.client_secret)

        await page.select_option("#days", "7")
        totals = "#totals-totals dd[data-key={}]"
        await expect(page.locator(totals.format("requests"))).to_have_attribute(
            "data-value", str(expected.requests)
        )
        for key in (
            "users",
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
            "client_errors",
            "server_errors",
        ):
            assert await value(page, totals.format(key)) == str(getattr(expected, key)), key
        await expect(page.locator("#chart-per_day canvas").first).to_be_visible()
        await shot(page, "overview")

        await page.get_by_role("link", name="Users").click()
        await page.select_option("#days", "7")
        rows = page.locator("#table-users tbody tr")
        await expect(rows).to_have_count(2)
        shown = {
            await rows.nth(i).locator("td[data-column=username]").inner_text(): (
                int(await value(rows.nth(i), "td[data-column=total_tokens]")),
                int(await value(rows.nth(i), "td[data-column=requests]")),
            )
            for i in range(2)
        }
        assert shown == {u: (expected.per_user_tokens[u], expected.per_user_requests[u]) for u in shown}
        await page.fill("#search", "bob")
        await expect(rows).to_have_count(1)
        await page.fill("#search", "")
        await expect(rows).to_have_count(2)
        await page.locator("#table-users th button", has_text="User").press("Enter")  # keyboard sorting
        await expect(page.locator("#table-users th").first).to_have_attribute("aria-sort", "descending")
        await expect(rows.first.locator("td[data-column=username]")).to_have_text("bob@other.org")
        await shot(page, "users")

        async with page.expect_download() as download_info:
            await page.locator("#table-users a.csv").click()
        download = await download_info.value
        with open(await download.path(), newline="") as handle:
            exported = list(csv.DictReader(handle))
        assert {row["username"]: int(row["total_tokens"]) for row in exported} == expected.per_user_tokens

        await page.get_by_role("link", name="alice@uni.edu").click()
        await expect(page.locator("h1")).to_have_text("User alice@uni.edu")
        day_rows = page.locator("#table-per_day tbody tr")
        await expect(day_rows).to_have_count(7)  # every day of the period, quiet ones as zeros
        counts = await page.locator("#table-per_day td[data-column=requests]").evaluate_all(
            "cells => cells.map(cell => Number(cell.dataset.value))"
        )
        assert sum(counts) == expected.per_user_requests["alice@uni.edu"]
        await shot(page, "user")

        await page.get_by_role("link", name="Models and clusters").click()
        model_rows = page.locator("#table-by_model tbody tr")
        await expect(model_rows).to_have_count(2)
        # the 401 without a token never reached a model: 6 of the 7 requests
        await expect(page.locator("#table-by_cluster tbody tr td[data-column=requests]")).to_have_attribute(
            "data-value", "6"
        )
        await shot(page, "models")

        await page.get_by_role("link", name="Live").click()
        await expect(page.locator("#table-recent tbody tr")).to_have_count(2)
        # the fake backend's job report: every model of the cluster running
        running = page.locator("#table-cluster_jobs td[data-column=jobs_running]")
        await expect(running.first).to_have_attribute("data-value", "1")
        await shot(page, "live")

        await page.get_by_role("link", name="Batches").click()
        batches = page.locator("#table-batches tbody tr")
        await expect(batches).to_have_count(2)
        await expect(
            page.locator("#table-batches td[data-column=lines_processed][data-value='120']")
        ).to_have_count(1)
        await shot(page, "batches")

        await page.set_viewport_size({"width": 390, "height": 844})  # a phone
        await page.get_by_role("link", name="Overview").click()
        await expect(page.locator(totals.format("requests"))).to_be_visible()
        width = await page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, "the page scrolls sideways at phone width"
        await shot(page, "phone")

        await page.get_by_role("button", name="Log out").click()
        await expect(page.get_by_role("alert")).to_have_text("You are logged out.")
        await page.goto(f"{origin}/dashboard/users")
        await expect(page).to_have_url(f"{origin}/dashboard/login")
        answer = await page.request.get(f"{origin}/dashboard/api/overview")
        assert answer.status == 401
    finally:
        await runner.cleanup()


async def test_a_globus_user_outside_the_admin_groups_is_refused(
    browser: Browser, backend: Server, globus: FakeGlobus, tmp_path: Path
) -> None:
    runner, origin = await seeded_gateway(tmp_path, backend, globus)
    globus.web_logins.redirect_uris.add(f"{origin}/dashboard/callback")
    globus.web_logins.signed_in = STRANGER
    try:
        page = await browser.new_page()
        await page.goto(f"{origin}/dashboard/login/globus")
        await expect(page.locator("h1")).to_have_text("Not allowed")
        assert not [c for c in await page.context.cookies() if c["name"] == "gateway_dashboard"]
        answer = await page.request.get(f"{origin}/dashboard/api/users")
        assert answer.status == 401
        revoked = [r for r in globus.requests if r.path.endswith("/token/revoke")]
        assert len(revoked) == 2, "the login's tokens are revoked once used"
    finally:
        await runner.cleanup()


async def test_static_admin_token_logs_in_and_a_plain_token_does_not(
    browser: Browser, backend: Server, tmp_path: Path
) -> None:
    runner, origin = await seeded_gateway(tmp_path, backend, None)
    try:
        page = await browser.new_page()
        await page.goto(f"{origin}/dashboard/")
        await page.fill("#token", "alice-token-0001")  # a valid token, but alice is no administrator
        await page.get_by_role("button", name="Log in").click()
        await expect(page.locator("h1")).to_have_text("Not allowed")
        await page.goto(f"{origin}/dashboard/login")
        await page.fill("#token", "admin-token-0001")
        await page.get_by_role("button", name="Log in").click()
        await expect(page).to_have_url(f"{origin}/dashboard/")
        await expect(page.locator("#totals-totals dd[data-key=requests]")).to_be_visible()
        session = next(c for c in await page.context.cookies() if c["name"] == "gateway_dashboard")
        assert session["httpOnly"] and session["sameSite"] == "Lax" and not session["secure"]
        forged = await page.request.post(f"{origin}/dashboard/logout", form={"csrf": "not-the-token"})
        assert forged.status == 400, "a logout without the session's CSRF token is refused"
    finally:
        await runner.cleanup()
