"""docs/configuration.md is the settings models, written out: every field described, nothing stale,
and the rate limits on by default stated where an operator looks (the reference, conf/gateway.yaml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from pydantic import BaseModel, Field

from proxy.process import config_doc
from proxy.settings import GatewaySettings
from proxy.settings.traffic import LimitSettings

ROOT = Path(__file__).resolve().parent.parent


def test_every_setting_is_described() -> None:
    assert config_doc.missing_descriptions() == []


def test_a_setting_without_a_description_is_found() -> None:
    class Inner(BaseModel):
        """A section."""

        explained: int = Field(default=1, description="yes")
        unexplained: int = 2

    class Outer(BaseModel):
        """The top."""

        inner: Inner = Inner()
        bare: Inner | None = None

    class Undocumented(BaseModel):
        value: int = Field(default=1, description="yes")

    class Top(BaseModel):
        """The top."""

        section: Undocumented = Undocumented()

    assert config_doc.missing_descriptions(Outer) == ["inner.unexplained", "bare.unexplained"]
    assert config_doc.missing_descriptions(Top) == ["section"]


def test_the_reference_is_current() -> None:
    """Fails after a field is added or changed until `python -m proxy.process.config_doc` is run."""
    result = subprocess.run(
        [sys.executable, "-m", "proxy.process.config_doc", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_the_reference_names_every_field_with_its_default() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    assert "| `server.backlog` | integer | `4096` |" in text
    assert "| `metrics.host` | string or null | `null` |" in text
    assert "| `auth.globus.client_id` | string | required |" in text
    for name in GatewaySettings.model_fields:
        assert f"`{name}" in text


def test_default_rate_limits_are_stated_in_the_reference_and_the_shipped_file() -> None:
    limits = LimitSettings()
    assert (limits.requests_per_second, limits.burst, limits.concurrent_per_user) == (10, 20, 32)
    text = (ROOT / "docs" / "configuration.md").read_text()
    assert "10 requests per second per user with bursts of 20, and\n  32 requests or streams" in text
    shipped = yaml.safe_load((ROOT / "conf" / "gateway.yaml").read_text())["limits"]
    assert LimitSettings.model_validate(shipped) == limits
