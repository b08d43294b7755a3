"""A site's adaptors written from the existing gateway's guide "Building Custom Adaptors"
(/work/shared/spec/custom-adaptors.md): its imports, class declarations, constructors and function
signatures as the guide prints them; its import snippets are gathered at the top. The guide
leaves the function bodies to the site ("you can introduce any logics you want"): here an echo
model, streaming through Django's `StreamingHttpResponse` as the guide's response model says. Not
the guide's: `from typing import List` (the guide uses `List` without importing it), the `json`
and `Jobs` imports, and the bodies.
"""

import json
from typing import List

from django.http import StreamingHttpResponse

from resource_server_async.endpoints.endpoint import BaseEndpoint
from resource_server_async.endpoints.endpoint import (
    SubmitTaskResponse,
    SubmitStreamingTaskResponse
)
from resource_server_async.clusters.cluster import BaseCluster
from resource_server_async.clusters.cluster import GetJobsResponse
from resource_server_async.clusters.cluster import Jobs


class CustomEndpoint(BaseEndpoint):
    """Custom endpoint implementation of BaseEndpoint."""

    def __init__(self,
        id: str,
        endpoint_slug: str,
        cluster: str,
        framework: str,
        model: str,
        endpoint_adapter: str,
        allowed_globus_groups: List[str] = None,
        allowed_domains: List[str] = None,
        config: dict = None
    ):
        # Assign custom config dictionary
        # From config fields in endpoints.json
        self.config = config

        # Initialize the rest of the common attributes
        super().__init__(
            id,
            endpoint_slug,
            cluster,
            framework,
            model,
            endpoint_adapter,
            allowed_globus_groups,
            allowed_domains
        )

    async def submit_task(self, data: dict) -> SubmitTaskResponse:
        """Submits a single interactive task to the compute resource."""
        params = data["model_params"]
        text = self.config["prefix"] + params["messages"][-1]["content"]
        answer = {
            "id": "chatcmpl-custom",
            "object": "chat.completion",
            "created": 0,
            "model": params["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
        return SubmitTaskResponse(result=json.dumps(answer), task_id=None, error_message=None, error_code=None)

    async def submit_streaming_task(self, data: dict, request_log_id: str) -> SubmitStreamingTaskResponse:
        """Submits a single interactive task to the compute resource with streaming enabled."""
        params = data["model_params"]
        words = (self.config["prefix"] + params["messages"][-1]["content"]).split()

        async def events():
            for word in words:
                chunk = {
                    "id": "chatcmpl-custom",
                    "object": "chat.completion.chunk",
                    "created": 0,
                    "model": params["model"],
                    "choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}],
                }
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        response = StreamingHttpResponse(streaming_content=events(), content_type="text/event-stream")
        return SubmitStreamingTaskResponse(
            response=response, task_id=request_log_id, error_message=None, error_code=None
        )


class CustomCluster(BaseCluster):
    """Custom implementation of BaseCluster."""
    
    def __init__(self,
        id: str,
        cluster_name: str,
        cluster_adapter: str,
        frameworks: List[str],
        openai_endpoints: List[str],
        allowed_globus_groups: List[str] = [],
        allowed_domains: List[str] = [],
        config: dict = None
    ):
        # Assign custom config dictionary
        # From config fields in endpoints.json
        self.config = config

        # Initialize the rest of the common attributes
        super().__init__(
            id,
            cluster_name,
            cluster_adapter,
            frameworks,
            openai_endpoints,
            allowed_globus_groups,
            allowed_domains
        )

    async def get_jobs(self) -> GetJobsResponse:
        """Provides a status of the cluster as a whole, including which models are running."""
        running = [
            {
                "Models": model,
                "Framework": self.frameworks[0],
                "Cluster": self.cluster_name,
                "Model Status": "running",
                "Description": f"{model} - echo",
                "Model Version": 1,
            }
            for model in self.config["models"]
        ]
        status = {
            "cluster": self.cluster_name,
            "total_models": len(running),
            "live_models": len(running),
            "stopped_models": 0,
        }
        jobs = Jobs(running=running, queued=[], stopped=[], others=[], private_batch_running=[],
                    private_batch_queued=[], cluster_status=status)
        return GetJobsResponse(jobs=jobs, error_message=None, error_code=None)
