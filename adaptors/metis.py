"""ALCF Metis models: OpenAI-compatible APIs that are up only while the Metis status says "Live".

`MetisEndpoint` is the existing gateway's adaptor of the same name. Before each request it
reads its cluster's job report (the Metis status document, mapped by
`adaptors.status_url.MetisCluster` and cached by the gateway) and refuses with 503 while the
model is not among the running ones, instead of sending a request Metis would reject. The
request is the client's fields with `stream` set to what the route serves, as the existing
gateway sends it. Its fixtures give `api_url` either as a base (`https://host/v1`) or as the full
URL of the one path the cluster offers (`https://host/v1/chat/completions`); both work.
"""

from __future__ import annotations

from typing import Any

from adaptors.context import AdaptorContext, ClusterJobs, no_jobs
from adaptors.direct_api import DirectAPIEndpoint
from adaptors.endpoint import SubmitStreamingTaskResponse, SubmitTaskResponse

_INTERNAL_FIELDS = ("api_port",)
"""Fields the existing gateway's own code may add, never sent to Metis."""


class MetisEndpoint(DirectAPIEndpoint):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._jobs: ClusterJobs = no_jobs

    async def startup(self, context: AdaptorContext) -> None:
        await super().startup(context)
        self._jobs = context.jobs

    async def submit_task(self, data: dict[str, Any]) -> SubmitTaskResponse:
        refusal = await self.not_live()
        if refusal is not None:
            return SubmitTaskResponse(error_code=refusal[0], error_message=refusal[1])
        return await super().submit_task(_shaped(data, stream=False))

    async def submit_streaming_task(
        self, data: dict[str, Any], request_log_id: str
    ) -> SubmitStreamingTaskResponse:
        refusal = await self.not_live()
        if refusal is not None:
            return SubmitStreamingTaskResponse(error_code=refusal[0], error_message=refusal[1])
        return await super().submit_streaming_task(_shaped(data, stream=True), request_log_id)

    async def not_live(self) -> tuple[int, str] | None:
        """(status, message) while the model cannot take requests; None when it is live."""
        report = await self._jobs(self.cluster)
        if report is None or report.jobs is None:
            reason = report.error_message if report is not None and report.error_message else "no status"
            return 503, f"Cannot tell whether '{self.model}' is live on {self.cluster}: {reason}"
        live = {name.strip() for job in report.jobs.running for name in job.Models.split(",") if name.strip()}
        if self.model not in live:
            return 503, f"'{self.model}' is not currently live on {self.cluster}."
        return None

    def _request(self, data: dict[str, Any]) -> tuple[str, bytes]:
        url, body = super()._request(data)
        openai_path = data["model_params"]["openai_endpoint"]
        if self._base_url.endswith(f"/{openai_path}"):
            return self._base_url, body
        return url, body


def _shaped(data: dict[str, Any], stream: bool) -> dict[str, Any]:
    params = {k: v for k, v in data["model_params"].items() if k not in _INTERNAL_FIELDS}
    return {**data, "model_params": {**params, "stream": stream}}
