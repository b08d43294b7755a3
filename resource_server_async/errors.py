"""`resource_server_async.errors`: the existing gateway's exceptions, each with its HTTP status.

Raised by an adaptor, the gateway answers that status (a 500 becomes 502: the fault is the
backend's, not the gateway's) with the OpenAI error envelope.
"""

from __future__ import annotations

from http import HTTPStatus

from adaptors.errors import AdaptorError


class BaseError(AdaptorError):
    status_code = HTTPStatus.INTERNAL_SERVER_ERROR
    code = "internal_error"


class ClusterNotFound(BaseError):
    status_code = HTTPStatus.NOT_FOUND
    code = "cluster_not_found"


class EndpointNotFound(BaseError):
    status_code = HTTPStatus.NOT_FOUND
    code = "endpoint_not_found"


class BatchNotFound(BaseError):
    status_code = HTTPStatus.NOT_FOUND
    code = "batch_not_found"


class Unauthorized(BaseError):
    status_code = HTTPStatus.UNAUTHORIZED
    code = "unauthorized"


class AccessDenied(BaseError):
    status_code = HTTPStatus.FORBIDDEN
    code = "access_denied"


class ClusterUnderMaintenance(BaseError):
    status_code = HTTPStatus.SERVICE_UNAVAILABLE
    code = "cluster_under_maintenance"


class GetJobsError(BaseError):
    code = "failed_to_get_cluster_jobs"


class UnsupportedFramework(BaseError):
    status_code = HTTPStatus.BAD_REQUEST
    code = "unsupported_framework"


class UnsupportedEndpoint(BaseError):
    status_code = HTTPStatus.BAD_REQUEST
    code = "unsupported_endpoint"


class BatchUnavailable(BaseError):
    status_code = HTTPStatus.BAD_REQUEST
    code = "batch_unavailable"


class QuotaExceeded(BaseError):
    status_code = HTTPStatus.BAD_REQUEST
    code = "quota_exceeded"


class BatchOngoing(BaseError):
    status_code = HTTPStatus.BAD_REQUEST
    code = "batch_ongoing"


class BatchFailed(BaseError):
    status_code = HTTPStatus.BAD_REQUEST
    code = "batch_failed"


class EndpointError(BaseError):
    code = "internal_endpoint_error"


class TooManyRequests(BaseError):
    status_code = HTTPStatus.TOO_MANY_REQUESTS
    code = "too_many_requests"


class RequestTimeout(BaseError):
    status_code = HTTPStatus.GATEWAY_TIMEOUT
    code = "request_timeout"
