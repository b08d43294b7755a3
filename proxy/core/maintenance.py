"""Clusters under maintenance: their routes answer 503 with the operator's message.

Set in the configuration (`maintenance: {cluster: message}`, the existing gateway's
MAINTENANCE_ERROR_NOTICES), reported down by the existing gateway's cron job through Redis
(proxy/core/maintenance_redis.py), or at run time in the maintenance file that
`inference-gateway maintenance on|off` edits; the file is re-read when it changes, so no restart
is needed. The file wins, then the cron job's report, then the configuration.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import yaml

from adaptors import BaseCluster, Jobs
from adaptors.cluster import JobInfo
from proxy.errors import ApiError

RECHECK_SECONDS = 1.0
RETRY_AFTER_SECONDS = 600
"""What a refused client is told (`Retry-After`), with `x-should-retry: false`: maintenance
outlasts the SDKs' automatic retries, which would only repeat the refusal."""


class Maintenance:
    def __init__(self, configured: Mapping[str, str], state_file: Path) -> None:
        self._configured = dict(configured)
        self._file = state_file
        self._from_file: dict[str, str] = {}
        self._seen: float | None = None
        self._checked = 0.0
        self.reported: dict[str, str] = {}
        """cluster → message, for clusters the cron job reports down (replaced whole by its reader)"""

    def message(self, cluster: str) -> str | None:
        self._refresh()
        for source in (self._from_file, self.reported, self._configured):
            if cluster in source:
                return source[cluster]
        return None

    def check(self, cluster: BaseCluster) -> None:
        message = self.message(cluster.cluster_name)
        if message is not None:
            raise ApiError(
                503, message, code="cluster_maintenance", retryable=False, retry_after=RETRY_AFTER_SECONDS
            )

    def stopped_jobs(self, cluster: BaseCluster, models: list[tuple[str, str]]) -> Jobs:
        """What /jobs shows meanwhile: every model of the cluster, stopped."""
        message = self.message(cluster.cluster_name) or ""
        stopped = [
            JobInfo.model_validate(
                {"Models": model, "Framework": framework, "Cluster": cluster.cluster_name,
                 "Model Status": "stopped", "Description": message}
            )
            for framework, model in models
        ]  # fmt: skip
        status = {"cluster": cluster.cluster_name, "maintenance": message, "stopped_models": len(stopped)}
        return Jobs(stopped=stopped, cluster_status=status)

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < RECHECK_SECONDS:
            return
        self._checked = now
        try:
            modified = self._file.stat().st_mtime
        except FileNotFoundError:
            self._from_file, self._seen = {}, None
            return
        if modified != self._seen:
            self._from_file, self._seen = read_state(self._file), modified


def read_state(path: Path) -> dict[str, str]:
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    return {str(k): str(v) for k, v in document.items()} if isinstance(document, dict) else {}


def write_state(path: Path, state: Mapping[str, str]) -> None:
    """Replaced whole (write and rename), so a gateway never reads half a file."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(yaml.safe_dump(dict(state)))
    temporary.replace(path)
