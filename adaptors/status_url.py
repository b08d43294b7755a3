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
from typing import Any

from pydantic import model_validator

from adaptors.cluster import JobInfo, Jobs
from adaptors.direct_api import DirectAPICluster, DirectAPIClusterConfig

_LISTS = {"Live": "running", "Stopped": "stopped"}


class MetisClusterConfig(DirectAPIClusterConfig):
    @model_validator(mode="before")
    @classmethod
    def _status_url_from_environment(cls, config: Any) -> Any:
        if isinstance(config, dict) and "status_url" not in config and os.environ.get("METIS_STATUS_URL"):
            return {**config, "status_url": os.environ["METIS_STATUS_URL"]}
        return config


class MetisCluster(DirectAPICluster):
    config_model = MetisClusterConfig

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
