"""A cluster whose job report comes from the site's qstat function on Globus Compute."""

from __future__ import annotations

import logging

import globus_sdk
from pydantic import ValidationError

from adaptors.cluster import GetJobsResponse, JobInfo, Jobs
from adaptors.compute_config import GlobusComputeClusterConfig
from adaptors.compute_jobs import EndpointStatuses, StatusReader, mark_disconnected
from adaptors.compute_results import UnreadableResult, as_json_text
from adaptors.compute_service import (
    GLOBUS_COMPUTE,
    ComputeService,
    TaskFailed,
    acquire_service,
    release_service,
)
from adaptors.configured import ConfiguredCluster
from adaptors.context import AdaptorContext
from adaptors.transport import transport_failure

log = logging.getLogger(__name__)


class GlobusComputeCluster(ConfiguredCluster[GlobusComputeClusterConfig]):
    """Runs the site's qstat function to learn which models run, queue or are stopped; a running
    model whose Compute endpoint lost its workers is shown as disconnected."""

    _context: AdaptorContext | None = None
    _service: ComputeService | None = None
    _statuses: EndpointStatuses | None = None

    async def startup(self, context: AdaptorContext) -> None:
        self._context = context
        self._service = acquire_service(self.config, context)
        self._statuses = context.shared.acquire(EndpointStatuses, (), EndpointStatuses)

    async def shutdown(self) -> None:
        if self._context is None or self._service is None:
            return
        self._context.shared.release(EndpointStatuses, ())
        await release_service(self._service, self._context)

    async def get_jobs(self) -> GetJobsResponse:
        if self._service is None:
            raise RuntimeError("GlobusComputeCluster used before startup()")
        config = self.config
        try:
            task_id = await self._service.submit(config.qstat_endpoint_uuid, config.qstat_function_uuid)
            value = await self._service.result(
                task_id, config.task_timeout_seconds, accept_dill=config.accept_dill_results
            )
        except globus_sdk.GlobusError as exc:
            failure = transport_failure(exc, GLOBUS_COMPUTE)
            log.warning(
                "Globus Compute failed the status task of %s: %s", self.cluster_name, type(exc).__name__
            )
            return GetJobsResponse(error_code=failure.status, error_message=failure.message)
        except TimeoutError:
            return GetJobsResponse(
                error_code=504, error_message="The cluster's status task did not finish in time."
            )
        except TaskFailed as exc:
            return GetJobsResponse(
                error_code=502, error_message=f"The cluster's status task failed: {exc}"[:500]
            )
        except UnreadableResult as exc:
            return GetJobsResponse(error_code=502, error_message=str(exc))
        try:
            jobs = Jobs.model_validate_json(as_json_text(value))
        except (ValueError, ValidationError):
            return GetJobsResponse(
                error_code=502, error_message="The cluster's status task returned no jobs report."
            )
        await mark_disconnected(jobs, self._status_reader)
        return GetJobsResponse(jobs=jobs)

    def _status_reader(self, job: JobInfo) -> StatusReader | None:
        return None if self._statuses is None else self._statuses.reader(job, self.cluster_name)
