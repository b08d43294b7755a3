"""The cluster adaptor contract: which models a cluster runs, queues or has stopped."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from adaptors._access import access_list
from adaptors.context import AdaptorContext


class JobInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    Models: str
    Framework: str
    Cluster: str


class Jobs(BaseModel):
    """The existing qstat function names the private batch lists with hyphens
    (`private-batch-running`); both spellings are read, the underscore one is written."""

    running: list[JobInfo] = Field(default_factory=list)
    queued: list[JobInfo] = Field(default_factory=list)
    stopped: list[JobInfo] = Field(default_factory=list)
    others: list[JobInfo] = Field(default_factory=list)
    private_batch_running: list[JobInfo] = Field(
        default_factory=list, validation_alias=AliasChoices("private_batch_running", "private-batch-running")
    )
    private_batch_queued: list[JobInfo] = Field(
        default_factory=list, validation_alias=AliasChoices("private_batch_queued", "private-batch-queued")
    )
    cluster_status: dict[str, Any] = Field(default_factory=dict)


class GetJobsResponse(BaseModel):
    jobs: Jobs | None = None
    error_message: str | None = None
    error_code: int | None = None
    error_detail: str | None = None
    """As in `SubmitTaskResponse`."""


class BaseCluster(ABC):
    def __init__(
        self,
        id: str,
        cluster_name: str,
        cluster_adapter: str,
        frameworks: Iterable[str],
        openai_endpoints: Iterable[str],
        allowed_globus_groups: str | Iterable[str] | None = None,
        allowed_domains: str | Iterable[str] | None = None,
    ) -> None:
        self.id = id
        self.cluster_name = cluster_name
        self.cluster_adapter = cluster_adapter
        self.frameworks = list(frameworks)
        self.openai_endpoints = [path.strip("/") for path in openai_endpoints]
        self.allowed_globus_groups = access_list(allowed_globus_groups)
        self.allowed_domains = access_list(allowed_domains)

    @abstractmethod
    async def get_jobs(self) -> GetJobsResponse:
        """Report every model's state; never send a completion to find out."""

    async def startup(self, context: AdaptorContext) -> None:
        """Open connections and pools; called once the event loop runs."""

    async def shutdown(self) -> None:
        """Release what `startup` opened."""
