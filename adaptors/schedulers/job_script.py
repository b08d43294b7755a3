"""The pilot's job script, as PBS and Slurm both take it: directives, the site's preamble, the
environment, the working directory, then the command.

The script is written to the staging directory and submitted by path, so the job runs exactly what
an operator can read there. Every value that reaches a directive line is checked to be one word of
plain characters (a newline would start a directive of its own); every value that reaches a shell
line is quoted.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Mapping

from adaptors.schedulers.contract import JobSpec, SchedulerError

DIRECTIVE_VALUE = re.compile(r"^[A-Za-z0-9_.:=+,@/%-]{1,256}$")
VARIABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
NAME_LENGTH = 64


def job_name(name: str) -> str:
    """A name both PBS and Slurm accept: letters, digits, `_`, `.` and `-`, starting with a letter."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "-", name)[:NAME_LENGTH] or "pilot"
    return cleaned if cleaned[0].isalpha() else f"p{cleaned}"[:NAME_LENGTH]


def walltime(seconds: int) -> str:
    """HH:MM:SS, hours past 24 included, as `-l walltime=` and `--time=` both read it."""
    if seconds <= 0:
        raise SchedulerError("walltime_seconds must be positive", retryable=False)
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"


def directive_value(field: str, value: str | int) -> str:
    text = str(value)
    if not DIRECTIVE_VALUE.fullmatch(text):
        raise SchedulerError(
            f"{field}: {text[:80]!r} is not a plain directive value (letters, digits and _.:=+,@/%- only)",
            retryable=False,
        )
    return text


def resources(
    given: Mapping[str, str | int], known: Iterable[str], defaults: Mapping[str, str | int | None]
) -> dict[str, str]:
    """The job's resources: the adaptor's configured defaults, overridden by the deployment's
    `resources`, each checked; a key the adaptor does not know is refused, naming it."""
    allowed = set(known)
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise SchedulerError(
            f"resources.{unknown[0]}: not a setting of this scheduler (known: {', '.join(sorted(allowed))})",
            retryable=False,
        )
    merged = {key: value for key, value in defaults.items() if value is not None}
    merged.update(given)
    return {key: directive_value(f"resources.{key}", value) for key, value in merged.items()}


def script(
    directive: str, directives: Iterable[str], preamble: Iterable[str], spec: JobSpec, directory: str
) -> str:
    """The whole script: `directive` is "#PBS" or "#SBATCH"; `directory` is where the job starts
    unless the spec names its own working directory."""
    if not spec.command:
        raise SchedulerError("the job has no command", retryable=False)
    lines = ["#!/bin/bash", *(f"{directive} {line}" for line in directives), *preamble]
    for name, value in spec.environment.items():
        if not VARIABLE_NAME.fullmatch(name) or "\x00" in value:
            raise SchedulerError(f"environment: {name[:80]!r} cannot be exported", retryable=False)
        lines.append(f"export {name}={shlex.quote(value)}")
    lines.append(f"cd {shlex.quote(spec.working_directory or directory)}")
    lines.append("exec " + " ".join(shlex.quote(part) for part in spec.command))
    return "\n".join(lines) + "\n"
