"""Reading a finished task's result as the Compute service hands it over.

The gateway asks for JSON results (`result_serializers: JSONData`), which no code runs to read. An
older globus-compute-endpoint ignores that request and answers with its default, `DillDataBase64`
(`00\\n` and the base64 of a dill pickle), which the JSON-only reader refuses. Such a result is named
for what it is, so that the site knows what to upgrade. An endpoint may opt in to accepting it
(`accept_dill_results`): the gateway then trusts the site's own Compute endpoint, and even so
rebuilds only plain data from the pickle (strings, numbers, lists, dicts), never a class or function.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
from typing import Any

import orjson
from globus_compute_sdk.serialize import ComputeSerializer, DillDataBase64, JSONData

DILL_HEADER = DillDataBase64.identifier
JSON_HEADER = JSONData.identifier
STRING_HEADER = JSON_HEADER + '"'
"""A JSON string, what the functions return (the answer's text): orjson reads it as `json.loads`
does, in a third of the time, except a lone surrogate, which it refuses (the serializer reads it)."""
DILL_REFUSED = (
    "The compute endpoint returned its result serialized with dill (DillDataBase64) instead of the "
    "JSON the gateway asked for: its globus-compute-endpoint is too old to honour result_serializers. "
    "Upgrade globus-compute-endpoint on the site, or set 'accept_dill_results: true' on this endpoint "
    "to trust the results of its own Compute endpoint."
)


class UnreadableResult(Exception):
    """The task succeeded, but its result cannot be read; the text says why, for the client."""


def read_result(serializer: ComputeSerializer, payload: str, accept_dill: bool) -> Any:
    """A result's value, from JSON, or from a dill pickle of plain data when `accept_dill`."""
    if payload.startswith(DILL_HEADER):
        if not accept_dill:
            raise UnreadableResult(DILL_REFUSED)
        return _plain_data(payload[len(DILL_HEADER) :])
    if not payload.startswith(JSON_HEADER):  # the serializer itself would also load code (dill)
        raise UnreadableResult(
            f"The task's result is in a form the gateway does not read (serializer {payload[:2]!r})."
        )
    if payload.startswith(STRING_HEADER):
        try:
            return orjson.loads(payload[len(JSON_HEADER) :])
        except orjson.JSONDecodeError:
            pass  # a lone surrogate, which the standard library reads; or not JSON, which it refuses
    try:
        return serializer.deserialize(payload)
    except Exception as exc:
        raise UnreadableResult(f"The task's result is unreadable ({type(exc).__name__}).") from None


def as_json_text(value: Any) -> str:
    """A function's return value as the answer's JSON text: the functions return a JSON string,
    anything else is encoded here. Raises `ValueError` for a string that is not JSON, and for a
    value JSON cannot hold (a set or bytes, which a dill result of plain data may carry). The check is
    orjson's (a tenth of the standard library's time, on every Compute answer); what orjson refuses
    and the standard library reads (NaN, integers beyond 64 bits) is still JSON to the gateway."""
    if isinstance(value, str):
        try:
            orjson.loads(value)
        except orjson.JSONDecodeError:
            try:
                json.loads(value)
            except RecursionError:
                raise ValueError("nested too deeply") from None
        return value
    try:
        return json.dumps(value)
    except TypeError as exc:
        raise ValueError(str(exc)) from None


class _PlainData(pickle.Unpickler):
    """A pickle runs code only through the classes and functions it names: none are looked up."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"{module}.{name}")


def _plain_data(encoded: str) -> Any:
    try:
        return _PlainData(io.BytesIO(base64.b64decode(encoded))).load()
    except Exception as exc:  # any malformed pickle, whatever the opcode it breaks on
        raise UnreadableResult(
            f"The compute endpoint's dill result is not plain data and was not read ({exc})."[:500]
        ) from None
