"""The Globus Compute function through which the gateway runs PBS on a cluster's login node:
stage a file, `qsub` a staged job script, `qstat -x -f -F json` some jobs, `qdel` one.

The gateway's `adaptors.schedulers.globus_compute.GlobusComputeScheduler` writes the job script
and reads what the commands print (the same code as for PBS run on the gateway host); this function
only writes files into the staging directory and runs the three commands, with a deadline and
bounded output, and returns `{"returncode", "stdout", "stderr"}` (`{"path"}` for a staged file).

Everything lives inside `pilot_scheduler`, for the reason given in README.md: the SDK may ship the
function's source alone. Standard library only.

    python compute-functions/pilot_scheduler.py register            # prints the function id
    python compute-functions/pilot_scheduler.py '{"action": "states", "job_ids": ["123"]}'
"""


def pilot_scheduler(request):
    """Run one action for the gateway; see README.md in this folder for the request's fields.

    The endpoint may set PILOT_STAGING_DIRECTORY: files are then written, and scripts submitted,
    only there. Refusals raise ValueError (a built-in type the endpoint can always send back).
    """
    import base64
    import os
    import re
    import subprocess
    import tempfile

    output_limit = 1024 * 1024
    file_name_pattern = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")
    job_id_pattern = re.compile(r"^[0-9]+(\[[0-9]*\])?(\.[A-Za-z0-9_.-]+)?$")

    if not isinstance(request, dict):
        raise ValueError("pilot_scheduler expects a dict with an 'action'")
    action = request.get("action")
    timeout = min(max(float(request.get("timeout_seconds", 60)), 1.0), 600.0)

    def staging_directory():
        directory = str(request.get("directory", ""))
        allowed = os.environ.get("PILOT_STAGING_DIRECTORY")
        if not directory.startswith("/"):
            raise ValueError("directory must be an absolute path")
        if allowed and os.path.realpath(directory) != os.path.realpath(allowed):
            raise ValueError(f"this endpoint stages files in {allowed} only")
        return directory

    def file_name():
        name = str(request.get("file_name", ""))
        if not file_name_pattern.fullmatch(name):
            raise ValueError("file_name must be a plain file name")
        return name

    def job_ids():
        ids = request.get("job_ids")
        if not isinstance(ids, list) or not ids or len(ids) > 1000:
            raise ValueError("job_ids must be a list of 1 to 1000 PBS job ids")
        for job_id in ids:
            if not isinstance(job_id, str) or not job_id_pattern.fullmatch(job_id):
                raise ValueError("job_ids must be PBS job ids")
        return ids

    def run(argv, variables=None):
        environment = dict(os.environ, **(variables or {}))
        try:
            done = subprocess.run(
                argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, env=environment
            )
        except FileNotFoundError:
            return {"returncode": 127, "stdout": "", "stderr": f"{argv[0]}: command not found"}
        except subprocess.TimeoutExpired:
            return {
                "returncode": -1,
                "stdout": "",
                "stderr": f"{argv[0]} did not finish within {timeout:g} s",
            }
        return {
            "returncode": done.returncode,
            "stdout": done.stdout[:output_limit].decode("utf-8", "replace"),
            "stderr": done.stderr[:output_limit].decode("utf-8", "replace"),
        }

    if action == "stage":
        directory, name = staging_directory(), file_name()
        content = base64.b64decode(str(request.get("content_base64", "")), validate=True)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
        try:
            with os.fdopen(descriptor, "wb") as file:
                os.fchmod(file.fileno(), 0o600)
                file.write(content)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, os.path.join(directory, name))
        except BaseException:
            if os.path.exists(temporary):
                os.unlink(temporary)
            raise
        return {"path": os.path.join(directory, name)}
    if action == "submit":
        return run(["qsub", os.path.join(staging_directory(), file_name())])
    if action == "states":
        return run(["qstat", "-x", "-f", "-F", "json", *job_ids()], {"TZ": "UTC"})
    if action == "end":
        return run(["qdel", job_ids()[0]])
    raise ValueError("action must be one of stage, submit, states, end")


if __name__ == "__main__":
    import json
    import sys

    if sys.argv[1:] == ["register"]:
        from globus_compute_sdk import Client
        from globus_compute_sdk.serialize import PureSourceTextInspect

        client = Client(code_serialization_strategy=PureSourceTextInspect())
        print(client.register_function(pilot_scheduler, description="PBS for the gateway's pilot jobs"))
    else:
        print(json.dumps(pilot_scheduler(json.loads(sys.argv[1])), indent=2))
