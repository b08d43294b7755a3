"""A site's adaptors written to the existing gateway's current contract (its code, not its guide):
constructors taking `tpm_model` and `tpm_user`, `submit_streaming_task(self, data)`,
`get_jobs(self, auth)` returning the jobs themselves, results as `SubmitTaskResult` with the
parsed document, Django's `StreamingHttpResponse` over a synchronous generator, failures raised."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from django.http import StreamingHttpResponse

from resource_server_async.clusters.cluster import BaseCluster
from resource_server_async.endpoints.endpoint import BaseEndpoint
from resource_server_async.errors import EndpointError, GetJobsError
from resource_server_async.schemas.batch import BatchStatus
from resource_server_async.schemas.clusters import JobInfo, JobsByStatus
from resource_server_async.schemas.endpoints import (
    BatchStatusResult,
    SubmitBatchResult,
    SubmitStreamingTaskResponse,
    SubmitTaskResult,
)


class CurrentEndpoint(BaseEndpoint):
    def __init__(
        self,
        id: str,
        endpoint_slug: str,
        cluster: str,
        framework: str,
        model: str,
        endpoint_adapter: str,
        tpm_model: int,
        tpm_user: int,
        config: dict[str, Any],
        allowed_globus_groups: list[str] | None = None,
        allowed_domains: list[str] | None = None,
    ):
        self.reply = config["reply"]
        super().__init__(
            id, endpoint_slug, cluster, framework, model, endpoint_adapter,
            tpm_model, tpm_user, allowed_globus_groups, allowed_domains,
        )  # fmt: skip

    async def submit_task(self, data: dict[str, Any]) -> SubmitTaskResult:
        if self.reply == "offline":
            raise EndpointError(f"{self.model!r} is not currently live.", status_code=503)
        answer = {
            "object": "chat.completion",
            "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": self.reply}}],
            "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5},
        }
        return SubmitTaskResult(result=answer, task_id=None)

    async def submit_streaming_task(self, data: dict[str, Any]) -> SubmitStreamingTaskResponse:
        def events() -> Iterator[str]:
            for word in self.reply.split():
                time.sleep(0.01)  # a blocking client library, as the existing gateway's adaptors may use
                yield f'data: {{"choices": [{{"index": 0, "delta": {{"content": "{word}"}}}}]}}\n\n'
            yield "data: [DONE]\n\n"

        response = StreamingHttpResponse(streaming_content=events(), content_type="text/event-stream")
        return SubmitStreamingTaskResponse(response=response, task_id=None)

    def has_batch_enabled(self) -> bool:
        return True

    async def submit_batch(self, batch_data: Any, username: str) -> SubmitBatchResult:
        if batch_data.input_file.endswith(".missing"):
            raise EndpointError(f"{batch_data.input_file} does not exist.", status_code=400)
        return SubmitBatchResult(
            input_file=batch_data.input_file, task_ids=f"task-of-{username}", status=BatchStatus.pending
        )

    async def get_batch_status(self, batch: Any) -> BatchStatusResult:
        return BatchStatusResult(status=BatchStatus.completed, result='{"num_responses": 2}')


class CurrentCluster(BaseCluster):
    def __init__(
        self,
        id: str,
        cluster_name: str,
        cluster_adapter: str,
        frameworks: list[str],
        openai_endpoints: list[str],
        config: dict[str, Any],
        allowed_globus_groups: list[str] | None = None,
        allowed_domains: list[str] | None = None,
    ):
        super().__init__(
            id, cluster_name, cluster_adapter, frameworks, openai_endpoints,
            allowed_globus_groups, allowed_domains,
        )  # fmt: skip

    async def get_jobs(self, auth: Any) -> JobsByStatus:  # type: ignore[override]
        if not self.frameworks:
            raise GetJobsError("no frameworks")
        if auth is not None and auth.username.startswith("bob"):
            raise GetJobsError("The scheduler is down.", status_code=503)
        job = JobInfo(Models="current-1", Framework=self.frameworks[0], Cluster=self.cluster_name)
        return JobsByStatus(running=[job], cluster_status={"asked_by": getattr(auth, "username", None)})
