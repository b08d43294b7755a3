"""Adaptor plug-ins and the contract they implement (see docs/adaptors.md)."""

from adaptors.cluster import BaseCluster, GetJobsResponse, JobInfo, Jobs
from adaptors.context import AdaptorContext
from adaptors.endpoint import (
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
