"""Adaptor plug-ins and the contract they implement (see docs/adaptors.md)."""

from adaptors.cluster import BaseCluster, GetJobsResponse, JobInfo, Jobs
from adaptors.context import AdaptorContext
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

__all__ = [
    "CLIENT_JSON",
    "AdaptorContext",
    "BaseCluster",
    "BaseEndpoint",
    "BatchStatusEnum",
    "GetBatchStatusResponse",
    "GetJobsResponse",
    "GetTaskResultResponse",
    "JobInfo",
    "Jobs",
    "StreamError",
    "SubmitBatchResponse",
    "SubmitStreamingTaskResponse",
    "SubmitTaskAsyncResponse",
    "SubmitTaskResponse",
]
