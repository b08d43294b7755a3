"""Adaptor plug-ins and the contract they implement (see docs/adaptors.md)."""

from adaptors.cluster import BaseCluster, GetJobsResponse, JobInfo, Jobs
from adaptors.configured import AdaptorConfig, ConfiguredCluster, ConfiguredEndpoint
from adaptors.context import AdaptorContext, SharedResources
from adaptors.endpoint import (
    CLIENT_JSON,
    BaseEndpoint,
    BatchStatusEnum,
    GetBatchStatusResponse,
    GetTaskResultResponse,
    StreamError,
    SubmitBatchResponse,
    SubmitStreamingTaskResponse,
    SubmitTaskAsyncResponse,
    SubmitTaskResponse,
)
from adaptors.transport import TransportFailure, transport_failure

__all__ = [
    "CLIENT_JSON",
    "AdaptorConfig",
    "AdaptorContext",
    "BaseCluster",
    "BaseEndpoint",
    "BatchStatusEnum",
    "ConfiguredCluster",
    "ConfiguredEndpoint",
    "GetBatchStatusResponse",
    "GetJobsResponse",
    "GetTaskResultResponse",
    "JobInfo",
    "Jobs",
    "SharedResources",
    "StreamError",
    "SubmitBatchResponse",
    "SubmitStreamingTaskResponse",
    "SubmitTaskAsyncResponse",
    "SubmitTaskResponse",
    "TransportFailure",
    "transport_failure",
]
