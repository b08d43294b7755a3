"""Plug-ins named by dotted path (endpoint, cluster and scheduler adaptors): imported while the
configuration is read, so a path that does not import stops start-up naming its entry."""

from __future__ import annotations

import importlib
from typing import TypeVar

Plugin = TypeVar("Plugin")


def import_class(dotted_path: str, base: type[Plugin]) -> type[Plugin]:
    """The class at `dotted_path`, a subclass of `base`; any package on PYTHONPATH works.
    Raises `ValueError` saying what is wrong with the path."""
    module_name, _, class_name = dotted_path.rpartition(".")
    if not module_name:
        raise ValueError(f"'{dotted_path}' is not a dotted path such as package.module.Class")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import module '{module_name}': {exc}") from exc
    found = getattr(module, class_name, None)
    if not isinstance(found, type) or not issubclass(found, base):
        what = "does not exist" if found is None else f"is not a subclass of {base.__name__}"
        raise ValueError(f"'{class_name}' in module '{module_name}' {what}")
    return found
