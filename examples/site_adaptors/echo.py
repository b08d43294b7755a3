"""An example site adaptor: it answers by echoing the prompt, with no backend at all.

It shows the whole contract in one page: a config model for the entry's `config` (validated by
the base when the gateway starts), a non-streaming answer, a stream as an async iterator of bytes,
an error before the stream starts, and a cluster that reports its models. Point an entry at it
with `endpoint_adapter: site_adaptors.echo.EchoEndpoint` when `examples/` is on PYTHONPATH.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from pydantic import Field

from adaptors import (
    AdaptorConfig,
    ConfiguredCluster,
    ConfiguredEndpoint,
    GetJobsResponse,
    JobInfo,
    Jobs,
    SubmitStreamingTaskResponse,
    SubmitTaskResponse,
)


class EchoConfig(AdaptorConfig):
    prefix: str = "echo: "
    word_delay: float = Field(default=0.0, ge=0)


class EchoEndpoint(ConfiguredEndpoint[EchoConfig]):
    async def submit_task(self, data: dict[str, Any]) -> SubmitTaskResponse:
        params = data["model_params"]
        if params["openai_endpoint"] != "chat/completions":
            return SubmitTaskResponse(error_code=400, error_message="The echo model only chats.")
        answer = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": params["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": self._reply(params)},
                    "finish_reason": "stop",
                }
            ],
        }
        return SubmitTaskResponse(result=json.dumps(answer), task_id=answer["id"])

    async def submit_streaming_task(
        self, data: dict[str, Any], request_log_id: str
    ) -> SubmitStreamingTaskResponse:
        params = data["model_params"]
        if params["openai_endpoint"] != "chat/completions":
            return SubmitStreamingTaskResponse(error_code=400, error_message="The echo model only chats.")
        return SubmitStreamingTaskResponse(response=self._stream(params), task_id=request_log_id)

    def _reply(self, params: dict[str, Any]) -> str:
        last = params["messages"][-1].get("content")
        return self.config.prefix + (last if isinstance(last, str) else "")

    async def _stream(self, params: dict[str, Any]) -> AsyncIterator[bytes]:
        for word in self._reply(params).split(" "):
            chunk = {
                "object": "chat.completion.chunk",
                "model": params["model"],
                "choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}],
            }
            yield f"data: {json.dumps(chunk)}\n\n".encode()
            await asyncio.sleep(self.config.word_delay)
        yield b"data: [DONE]\n\n"


class EchoClusterConfig(AdaptorConfig):
    models: list[str] = Field(default_factory=list)


class EchoCluster(ConfiguredCluster[EchoClusterConfig]):
    """Reports the models named in its config as running."""

    async def get_jobs(self) -> GetJobsResponse:
        framework = self.frameworks[0]
        running = [
            JobInfo(Models=m, Framework=framework, Cluster=self.cluster_name) for m in self.config.models
        ]
        status = {"cluster": self.cluster_name, "total_models": len(running), "live_models": len(running)}
        return GetJobsResponse(jobs=Jobs(running=running, cluster_status=status))
