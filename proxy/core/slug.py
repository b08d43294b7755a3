"""Endpoint slugs, computed exactly as the existing gateway's Django `slugify` does."""

import re
import unicodedata
from functools import lru_cache

_NOT_SLUG = re.compile(r"[^\w\s-]")
_SEPARATORS = re.compile(r"[-\s]+")


def slugify(value: str) -> str:
    ascii_only = unicodedata.normalize("NFKD", value).encode("ascii", "ignore").decode("ascii")
    return _SEPARATORS.sub("-", _NOT_SLUG.sub("", ascii_only.lower())).strip("-_")


@lru_cache(maxsize=4096)
def endpoint_slug(cluster: str, framework: str, model: str) -> str:
    """Cached: every inference request computes one, mostly for the same few models."""
    return slugify(" ".join([cluster, framework, model.lower()]))
