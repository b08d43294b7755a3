"""The benchmark's auth section: what authentication costs a request.

A gateway with the `static` provider against one with the `globus` provider and a warm cache, each
started alone on CPU 1 in turn (static, globus, static, globus, ...), with a local fake of Globus
(bench/fake_globus_server.py) on CPU 0. The fake counts the calls it answered: with a warm cache,
each globus gateway introspects the benchmark's token once.
"""

from __future__ import annotations

import json
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Final

from bench.alternating import (
    GATEWAY_PATH,
    SERIAL_WARM_REQUESTS,
    best_of,
    measure_chat,
    run_disturbances,
    run_failures,
)
from bench.common import (
    GATEWAY_CPU,
    LOADGEN_CPU,
    STATIC_AUTH,
    TOKEN,
    Check,
    Service,
    difference,
    read_announcement,
    show,
    start_service,
    table_row,
    wait_ready,
    warm,
    write_gateway_config,
)
from testing.ports import free_port

AUTH_PROVIDERS: Final = ("static", "globus")
AUTH_CONCURRENCIES: Final = (64, 16)
AUTH_SECONDS: Final = 4.0
AUTH_ROUNDS: Final = 3
GLOBUS_C64_RPS_RATIO: Final = "globus_c64_rps_ratio"
GLOBUS_INTROSPECTIONS: Final = "globus_introspections_per_gateway"


def globus_calls(service: Service) -> dict[str, int]:
    """The fake Globus's count of calls per API, which it prints when stopped."""
    service.stop()
    for line in reversed(service.log.read_text(errors="replace").splitlines()):
        if line.startswith('{"counts"'):
            calls: dict[str, int] = json.loads(line)["counts"]
            return calls
    raise RuntimeError(f"the {service.name} did not report its calls:\n{service.log_tail()}")


def globus_auth(fake: dict[str, Any]) -> dict[str, Any]:
    """The gateway's `auth` section pointing at the fake; the cache keeps its default lifetime (10 min)."""
    keys = ("client_id", "client_secret", "scope", "auth_url", "groups_url")
    settings = {key: fake[key] for key in keys} | {"authorized_idp_domains": ["example.org"]}
    return {"provider": "globus", "globus": settings}


class AuthBench:
    """Static against warm-cache globus auth: one gateway at a time on the gateway's CPU, alternating."""

    def __init__(
        self, workdir: Path, backend: Service, backend_port: int, seconds: float, rounds: int
    ) -> None:
        self.workdir = workdir
        self.backend_pid = backend.process.pid
        self.backend_port = backend_port
        self.seconds = seconds
        self.rounds = rounds

    def compare(self) -> dict[str, Any]:
        runs = []
        for round_number in range(1, self.rounds + 1):
            for provider in AUTH_PROVIDERS:
                runs.append({"provider": provider, "round": round_number, **self._run(provider)})
                print(f"auth ({provider}), round {round_number}: done", file=sys.stderr)
        return summarize_auth(runs, self.seconds, self.rounds)

    def _run(self, provider: str) -> dict[str, Any]:
        """Start a fresh gateway (and fake Globus) for one run, measure each concurrency, stop them."""
        with ExitStack() as services:
            auth = STATIC_AUTH
            fake: Service | None = None
            if provider == "globus":
                fake_args = ["-m", "bench.fake_globus_server", "--token", TOKEN]
                fake = start_service("fake-globus", LOADGEN_CPU, fake_args, self.workdir)
                services.callback(fake.stop)
                auth = globus_auth(read_announcement(fake))
            gateway, port = self._start_gateway(provider, auth, services)
            url = f"http://127.0.0.1:{port}{GATEWAY_PATH}"
            warm(url, SERIAL_WARM_REQUESTS)
            ours = [self.backend_pid, gateway.process.pid] + ([fake.process.pid] if fake else [])
            measured = {
                str(level): measure_chat(url, level, self.seconds, ours) for level in AUTH_CONCURRENCIES
            }
            gateway.check_running()
            gateway.stop()
            run: dict[str, Any] = {"by_concurrency": measured}
            if fake is not None:
                run["globus_calls"] = globus_calls(fake)
            return run

    def _start_gateway(self, provider: str, auth: dict[str, Any], services: ExitStack) -> tuple[Service, int]:
        port = free_port()
        config = write_gateway_config(
            self.workdir, port, self.backend_port, auth=auth, name=f"gateway-{provider}.yaml"
        )
        args = ["-m", "proxy", "--config", str(config)]
        gateway = start_service(f"gateway-{provider}", GATEWAY_CPU, args, self.workdir)
        services.callback(gateway.stop)
        wait_ready(gateway, f"http://127.0.0.1:{port}/resource_server/health")
        return gateway, port


def summarize_auth(runs: list[dict[str, Any]], seconds: float, rounds: int) -> dict[str, Any]:
    """Compare the best run of each provider per concurrency; every run stays in the figures."""
    by_concurrency = {}
    for level in map(str, AUTH_CONCURRENCIES):
        static, globus = (best_of(runs, provider, level, key="provider") for provider in AUTH_PROVIDERS)
        by_concurrency[level] = {
            "static": static,
            "globus": globus,
            "rps_ratio": round(globus["rps"] / static["rps"], 3) if static["rps"] else None,
            "median_rps_ratio": (
                round(globus["rps_median"] / static["rps_median"], 3) if static["rps_median"] else None
            ),
            "added_p50_ms": difference(globus["p50_ms"], static["p50_ms"]),
            "added_p99_ms": difference(globus["p99_ms"], static["p99_ms"]),
        }
    introspections = [run["globus_calls"]["introspections"] for run in runs if "globus_calls" in run]
    return {
        "comparison": f"best of {rounds} alternating runs",
        "seconds_per_measure": seconds,
        "rounds": rounds,
        "order": [f"{run['provider']} {run['round']}" for run in runs],
        "warm_requests": SERIAL_WARM_REQUESTS,
        "by_concurrency": by_concurrency,
        "globus_introspections": introspections,
        "introspections_per_gateway": max(introspections, default=None),
        "runs": runs,
    }


def auth_checks(auth: dict[str, Any]) -> dict[str, Check]:
    auth_c64 = auth.get("by_concurrency", {}).get("64", {})
    return {
        GLOBUS_C64_RPS_RATIO: (auth_c64.get("rps_ratio"), "≥ 95% of static", lambda v: v >= 0.95),
        GLOBUS_INTROSPECTIONS: (auth.get("introspections_per_gateway"), "1 (warm cache)", lambda v: v == 1),
    }


def auth_rows(auth: dict[str, Any], judged: dict[str, Any]) -> list[str]:
    rows = []
    for level, pair in auth["by_concurrency"].items():
        rows.extend(_level_rows(level, pair, auth["comparison"], judged))
    introspections = auth["introspections_per_gateway"]
    rows.append(
        table_row(
            "globus: introspections per gateway run",
            None,
            introspections,
            "—",
            "",
            judged[GLOBUS_INTROSPECTIONS],
        )
    )
    return rows


def _level_rows(level: str, pair: dict[str, Any], comparison: str, judged: dict[str, Any]) -> list[str]:
    """Static and globus one under the other in the Gateway column: the Direct column does not apply."""
    static, globus = pair["static"], pair["globus"]
    ratio = pair.get("rps_ratio")
    share = show(ratio * 100, "% of static") if ratio is not None else "—"
    prefix = f"c={level}, {comparison}"
    rows = [
        table_row(f"{prefix}: static auth requests/s", None, static["rps"], "—", ""),
        table_row(
            f"{prefix}: globus auth (warm cache) requests/s",
            None,
            globus["rps"],
            share,
            "",
            judged.get(f"globus_c{level}_rps_ratio"),
        ),
    ]
    for rank in ("p50", "p99"):
        added = show(pair.get(f"added_{rank}_ms"), " ms vs static")
        rows.append(table_row(f"{prefix}: static auth {rank}", None, static[f"{rank}_ms"], "—", " ms"))
        rows.append(table_row(f"{prefix}: globus auth {rank}", None, globus[f"{rank}_ms"], added, " ms"))
    shares = f"{static['other_cpu_share']:.0%} / {globus['other_cpu_share']:.0%}"
    rows.append(
        table_row(f"{prefix}: CPUs 0-1 taken by other processes, static / globus", None, shares, "—", "")
    )
    return rows


def auth_failures(auth: dict[str, Any]) -> list[str]:
    return run_failures("auth", auth, "provider")


def auth_disturbances(auth: dict[str, Any], threshold: float) -> list[str]:
    return run_disturbances("auth", auth, "provider", threshold)
