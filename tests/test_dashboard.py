"""The Grafana dashboard and the alerting rules in deploy/, evaluated by a real Prometheus scraping a
real gateway with two workers: every query parses and finds the series it is meant to show
(issue 15.5)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp

from testing.services.prometheus_server import PrometheusServer
from tests.processes import gateway_process
from tests.support import CHAT_MODEL, Server, auth, chat, free_port, write_gateway_config

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
RULES = ROOT / "deploy" / "prometheus-rules.yml"
CHAT = "/resource_server/local/vllm/v1/chat/completions"


def targets() -> dict[str, str]:
    """Every query of every panel, by panel title, with the dashboard's variables set to All."""
    return {
        f"{panel['title']} [{target['refId']}]": target["expr"]
        .replace("$instance", ".*")
        .replace("$cluster", ".*")
        for panel in DASHBOARD["panels"]
        for target in panel["targets"]
    }


async def traffic(http: aiohttp.ClientSession, url: str) -> None:
    """Answers of every kind: success, a stream, a backend failure, a wrong token, a client hanging up."""
    for _ in range(5):
        async with http.post(f"{url}{CHAT}", json=chat(), headers=auth()) as response:
            assert response.status == 200
    async with http.post(f"{url}{CHAT}", json=chat("[[chunks=3]]", stream=True), headers=auth()) as response:
        await response.read()
    async with http.post(f"{url}{CHAT}", json=chat("[[status=500]]"), headers=auth()) as response:
        assert response.status == 502
    async with http.get(
        f"{url}/resource_server/whoami", headers={"Authorization": "Bearer wrong"}
    ) as response:
        assert response.status == 401
    async with aiohttp.ClientSession() as client:
        body = chat("[[chunks=50]][[chunk_delay=0.1]]", stream=True)
        response = await client.post(f"{url}{CHAT}", json=body, headers=auth())
        await response.content.readany()
        response.close()


def panel_of(title: str) -> str:
    return next(key for key in targets() if key.startswith(title))


async def test_every_panel_and_rule_evaluates_on_a_real_prometheus(backend: Server, tmp_path: Path) -> None:
    config = write_gateway_config(tmp_path, backend.url, port=free_port())
    async with gateway_process(config, "--workers", "2") as gateway, aiohttp.ClientSession() as http:
        workers = {str(pid) for pid in gateway.children()}
        target = gateway.url.removeprefix("http://")
        async with PrometheusServer(tmp_path / "prometheus", target, [RULES]) as prometheus:
            await traffic(http, gateway.url)
            await asyncio.sleep(1.1)  # workers share their values once a second
            await prometheus.scraped(2)
            results = {title: await prometheus.query(expression) for title, expression in targets().items()}
            instances = await prometheus.api("label/instance/values", **{"match[]": "gateway_requests_total"})
            clusters = await prometheus.api("label/cluster/values", **{"match[]": "gateway_requests_total"})
            rules = await prometheus.api("rules")

    def series(title: str) -> list[dict[str, Any]]:
        return results[panel_of(title)]

    status_classes = {s["metric"]["status_class"] for s in series("Requests per second by status class")}
    assert {"2xx", "4xx", "5xx"} <= status_classes
    assert series("Requests and streams in flight"), "a gauge at rest is 0, still a series"
    assert {s["metric"]["phase"] for s in series("Where time goes")} >= {
        "authentication",
        "total",
        "first_byte",
    }
    assert {s["metric"]["model"] for s in series("Backend failures by model")} == {CHAT_MODEL}
    assert {s["metric"]["outcome"] for s in series("Clients that went away")} == {"client_gone"}
    assert series("Tokens per second by model")
    for title in ("Open files per process", "Resident memory per process", "CPU per process"):
        assert {s["metric"]["pid"] for s in series(title)} == workers, title
    assert instances == [target] and "local" in clusters
    variables = {variable["name"] for variable in DASHBOARD["templating"]["list"]}
    assert {"instance", "cluster"} <= variables
    assert all("$instance" in target["expr"] for panel in DASHBOARD["panels"] for target in panel["targets"])
    loaded = [rule for group in rules["groups"] for rule in group["rules"]]
    assert len(loaded) == 4 and all(rule["health"] == "ok" for rule in loaded), loaded


def test_the_dashboard_has_the_panels_operators_asked_for() -> None:
    used = " ".join(targets().values())
    for name in (
        "gateway_rate_limited_total", "gateway_compute_tasks_in_flight", "gateway_upstream_errors_total",
        "gateway_auth_cache_lookups_total", "process_open_fds", "process_max_fds",
    ):  # fmt: skip
        assert name in used, name
    failures = targets()[panel_of("Backend failures by model")]
    assert 'outcome="backend_error"' in failures, "clients that hung up are not backend failures"
