"""PBS on a cluster reached through Globus Compute: the site's `qsub`, `qstat` and `qdel` run on its
login node by the registered function compute-functions/pilot_scheduler.py (one function, an
`action` per call), for a gateway that is not on the cluster.

The job script is built here, exactly as for PBS run on the gateway host, and staged through the
function; what the commands print comes back as text and is read by the same parser
(pbs_format.py). Tasks go through the gateway's shared Compute service (adaptors/compute_service.py:
one SDK client and result poller per set of credentials, blocking calls on the adaptors' executor).
Credentials as for Compute endpoints: the entry's, else GLOBUS_ENDPOINT_CREDENTIALS_OVERRIDES for
the endpoint, else SERVICE_ACCOUNT_ID / SERVICE_ACCOUNT_SECRET.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Any

import globus_sdk
from pydantic import BaseModel, Field, ValidationError

from adaptors.compute_config import UUID, ComputeAccess
from adaptors.compute_results import UnreadableResult
from adaptors.compute_service import ComputeService, TaskFailed, acquire_service, release_service
from adaptors.context import AdaptorContext
from adaptors.schedulers import pbs_format
from adaptors.schedulers.commands import MESSAGE_CHARS, CommandResult, ScriptSettings, validated
from adaptors.schedulers.contract import JobSpec, JobStatus, SchedulerError
from adaptors.schedulers.script_scheduler import ScriptScheduler
from adaptors.schedulers.staging import checked_file_name

IDS_PER_CALL = 100
REFUSED_STATUSES = (400, 403, 404, 422)
"""The service's answers that asking again will not change (an unknown function or endpoint)."""


class GlobusComputeSchedulerConfig(ComputeAccess, ScriptSettings, pbs_format.PbsJobSettings):
    endpoint_field = "endpoint_uuid"

    endpoint_uuid: str = Field(pattern=UUID)
    """The Compute endpoint on the cluster's login node."""
    function_uuid: str = Field(pattern=UUID)
    """compute-functions/pilot_scheduler.py as the site registered it."""
    task_timeout_seconds: float = Field(default=180, gt=0)
    """How long one task may take, queueing at the endpoint included."""
    accept_dill_results: bool = False


class _Answer(BaseModel):
    returncode: int
    stdout: str
    stderr: str


class _Staged(BaseModel):
    path: str


class GlobusComputeScheduler(ScriptScheduler[GlobusComputeSchedulerConfig]):
    """PBS through Globus Compute: every operation is one task of the site's pilot_scheduler
    function (a staged script and its qsub are two)."""

    directive = "#PBS"
    script_suffix = ".pbs"

    def __init__(self, name: str, config: Mapping[str, Any]) -> None:
        super().__init__(name, validated(GlobusComputeSchedulerConfig, config))
        self._context: AdaptorContext | None = None
        self._service: ComputeService | None = None

    async def startup(self, context: AdaptorContext) -> None:
        self._context = context
        self._service = acquire_service(self.config, context)

    async def shutdown(self) -> None:
        if self._context is not None and self._service is not None:
            await release_service(self._service, self._context)
            self._service = None

    def staging_path(self, file_name: str) -> str:
        return f"{self.config.staging_directory}/{file_name}"

    async def stage(self, content: bytes, file_name: str) -> str:
        request = {
            "action": "stage",
            "directory": self.config.staging_directory,
            "file_name": checked_file_name(file_name),
            "content_base64": base64.b64encode(content).decode(),
        }
        try:
            return _Staged.model_validate(await self._call(request)).path
        except ValidationError:
            raise SchedulerError("the pilot_scheduler function answered no staged path") from None

    def directives(self, spec: JobSpec, job_name: str, log_path: str) -> list[str]:
        return pbs_format.directives(self.config, spec, job_name, log_path, self.config.directives)

    async def submit(self, spec: JobSpec) -> str:
        script = await self.staged_script(spec)
        directory = self.config.staging_directory
        request = {"action": "submit", "directory": directory, "file_name": script.file_name}
        return pbs_format.submitted_id(await self._command(request))

    async def states(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        ids = pbs_format.checked_ids(job_ids)
        found: dict[str, JobStatus] = {}
        for start in range(0, len(ids), IDS_PER_CALL):
            batch = ids[start : start + IDS_PER_CALL]
            found.update(
                pbs_format.statuses(batch, await self._command({"action": "states", "job_ids": batch}))
            )
        return found

    async def end(self, job_id: str) -> None:
        pbs_format.checked_ids([job_id])
        pbs_format.deleted(job_id, await self._command({"action": "end", "job_ids": [job_id]}))

    async def _command(self, request: dict[str, Any]) -> CommandResult:
        try:
            answer = _Answer.model_validate(await self._call(request))
        except ValidationError:
            raise SchedulerError("the pilot_scheduler function answered no command output") from None
        return CommandResult(answer.returncode, answer.stdout, answer.stderr)

    async def _call(self, request: dict[str, Any]) -> Any:
        """One task: its value, or a `SchedulerError` saying whether asking again may help."""
        if self._service is None:
            raise RuntimeError("GlobusComputeScheduler used before startup()")
        config = self.config
        request = {**request, "timeout_seconds": config.command_timeout_seconds}
        try:
            task_id = await self._service.submit(config.endpoint_uuid, config.function_uuid, request)
            return await self._service.result(
                task_id, config.task_timeout_seconds, accept_dill=config.accept_dill_results
            )
        except globus_sdk.GlobusAPIError as exc:
            refused = exc.http_status in REFUSED_STATUSES
            raise SchedulerError(
                f"Globus Compute refused the scheduler task: {exc.http_status} {exc.code}",
                retryable=not refused,
            ) from None
        except globus_sdk.GlobusError as exc:
            raise SchedulerError(f"Globus Compute could not be reached: {type(exc).__name__}") from None
        except TimeoutError:
            raise SchedulerError(
                f"the scheduler task did not finish within {config.task_timeout_seconds:g} s"
            ) from None
        except TaskFailed as exc:
            lines = [line for line in str(exc).splitlines() if line.strip()]
            said = lines[-1] if lines else "no message"
            raise SchedulerError(
                f"the pilot_scheduler function failed: {said}"[:MESSAGE_CHARS],
                retryable=not said.startswith("ValueError"),
            ) from None
        except UnreadableResult as exc:
            raise SchedulerError(str(exc)[:MESSAGE_CHARS], retryable=False) from None
