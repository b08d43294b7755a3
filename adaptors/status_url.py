"""A cluster whose model status comes from an HTTP status document in its own format.

`MetisCluster` reads the document ALCF's Metis publishes, a mapping of models to
`{"model", "description", "status": "Live" | "Stopped" | ..., "model_version", ...}`, and reports
it in the gateway's jobs shape. Fields that only operators should see (keys, URLs, endpoint ids)
are not copied.

Its `status_url` may come from the existing gateway's `METIS_STATUS_URL` environment variable
instead of the entry's `config` (the existing gateway's fixtures leave `config` empty).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from adaptors.cluster import JobInfo, Jobs
from adaptors.direct_api import DirectAPICluster

_LISTS = {"Live": "running", "Stopped": "stopped"}


class MetisCluster(DirectAPICluster):
    def __init__(
        self,
        id: str,
        cluster_name: str,
        cluster_adapter: str,
        frameworks: Iterable[str],
        openai_endpoints: Iterable[str],
        allowed_globus_groups: str | Iterable[str] | None = None,
        allowed_domains: str | Iterable[str] | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        config = dict(config or {})
        if "status_url" not in config and os.environ.get("METIS_STATUS_URL"):
            config["status_url"] = os.environ["METIS_STATUS_URL"]
        super().__init__(
            id, cluster_name, cluster_adapter, frameworks, openai_endpoints,
            allowed_globus_groups, allowed_domains, config,
        )  # fmt: skip

    def jobs_from(self, document: Any) -> Jobs:
        if not isinstance(document, dict) or not all(isinstance(m, dict) for m in document.values()):
            raise ValueError("a Metis status document maps names to model descriptions")
        jobs = Jobs()
        framework = self.frameworks[0]
        for model in document.values():
            status = str(model.get("status", "Unknown"))
            name = str(model.get("model", ""))
            job = JobInfo.model_validate(
                {
                    "Models": name,
                    "Framework": framework,
                    "Cluster": self.cluster_name,
                    "Model Status": "running" if status == "Live" else status.lower(),
                    "Description": f"{name} - {model.get('description', '')}",
                    "Model Version": model.get("model_version", ""),
                }
            )
            getattr(jobs, _LISTS.get(status, "queued")).append(job)
        jobs.cluster_status = {
            "cluster": self.cluster_name,
            "total_models": len(document),
            "live_models": len(jobs.running),
            "stopped_models": len(jobs.stopped),
        }
        return jobs
