"""A misconfigured `on_demand` section stops start-up naming the file, the entry and the field;
a deployment naming an unknown scheduler is refused when its endpoint declares it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.settings import load_settings
from proxy.settings.files import ConfigError
from tests.deployment_setup import make_site, spec, start_on_demand, write_on_demand_config
from tests.support import free_port


def config_with(tmp_path: Path, port: int | None = None, **changes: Any) -> Path:
    site = make_site(tmp_path / "site")
    config = write_on_demand_config(
        tmp_path / "gw", site, f"sqlite:///{tmp_path / 'gw.db'}", free_port() if port is None else port
    )
    document = yaml.safe_load(config.read_text())
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        target = document["on_demand"]
        for parent in parents:
            target = target[parent]
        if value is None:
            del target[last]
        else:
            target[last] = value
    config.write_text(yaml.safe_dump(document))
    return config


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"schedulers__local__adapter": "adaptors.schedulers.nowhere.Scheduler"},
            "field 'on_demand.schedulers.local': Value error, adapter: cannot import module",
        ),
        (
            {"schedulers__local__adapter": "adaptors.direct_api.DirectAPIEndpoint"},
            "field 'on_demand.schedulers.local': Value error, adapter: 'DirectAPIEndpoint' in module "
            "'adaptors.direct_api' is not a subclass of Scheduler",
        ),
        (
            {"schedulers__local__config": {"state_dir": "relative"}},
            "field 'on_demand.schedulers.local': Value error, config.state_dir: must be an absolute path",
        ),
        ({"schedulers__local__pilot_command": []}, "field 'on_demand.schedulers.local.pilot_command'"),
        ({"gateway_key": "missing.key"}, "field 'on_demand.gateway_key': no such file"),
        ({"ca_file": None}, "field 'on_demand.ca_file': required when on_demand.enabled"),
        ({"lease_seconds": 1, "reconcile_seconds": 2}, "lease_seconds: must exceed twice reconcile_seconds"),
    ],
)
def test_a_misconfiguration_names_the_file_and_field(
    tmp_path: Path, changes: dict[str, Any], expected: str
) -> None:
    config = config_with(tmp_path, **changes)
    with pytest.raises(ConfigError) as raised:
        load_settings(config)
    assert str(raised.value).startswith(f"{config}: ")
    assert expected in str(raised.value)


def test_a_scheduler_name_is_a_word(tmp_path: Path) -> None:
    config = config_with(tmp_path)
    document = yaml.safe_load(config.read_text())
    schedulers = document["on_demand"]["schedulers"]
    schedulers["bad name"] = schedulers.pop("local")
    config.write_text(yaml.safe_dump(document))
    with pytest.raises(ConfigError, match=r"field 'on_demand\.schedulers': .*scheduler name 'bad name'"):
        load_settings(config)


def test_the_pilots_callback_address_is_required_with_an_ephemeral_port(tmp_path: Path) -> None:
    config = config_with(tmp_path, port=0)
    with pytest.raises(
        ConfigError, match=re.escape("field 'on_demand.gateway_url': required when server.port is 0")
    ):
        load_settings(config)
    assert load_settings(config_with(tmp_path / "2", port=0, gateway_url="https://gw.example.org/pilots"))


def test_the_pilots_callback_address_is_required_with_a_wildcard_host(tmp_path: Path) -> None:
    config = config_with(tmp_path)
    document = yaml.safe_load(config.read_text())
    document["server"]["host"] = "0.0.0.0"
    config.write_text(yaml.safe_dump(document))
    with pytest.raises(ConfigError, match=r"required when server\.host is a wildcard"):
        load_settings(config)


def test_relative_certificate_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    config = config_with(tmp_path, ca_file="../site/ca.pem")
    assert load_settings(config).on_demand.ca_file == config.parent / "../site/ca.pem"


async def test_a_deployment_naming_an_unknown_scheduler_is_refused(tmp_path: Path) -> None:
    runner, _, controller = await start_on_demand(config_with(tmp_path))
    try:
        with pytest.raises(
            ValueError, match=re.escape("config.scheduler: no scheduler 'pbs' in on_demand.schedulers")
        ):
            controller.declare(spec(scheduler="pbs"))
        with pytest.raises(ValueError, match="deployment name"):
            controller.declare(spec(name="no/slashes"))
    finally:
        await runner.cleanup()


async def test_a_deployment_with_resources_its_scheduler_cannot_submit_is_refused(tmp_path: Path) -> None:
    """Checked when declared, so that the mistake stops start-up rather than fail every start."""
    pbs = {
        "adapter": "adaptors.schedulers.pbs.PbsScheduler",
        "config": {"staging_directory": str(tmp_path / "staging")},
        "pilot_command": ["python", "-m", "pilot"],
        "pilot_certificate": "/p/pilot.pem",
        "pilot_key": "/p/pilot.key",
        "pilot_ca": "/p/ca.pem",
    }
    runner, _, controller = await start_on_demand(config_with(tmp_path, schedulers__pbs=pbs))
    try:
        with pytest.raises(
            ValueError, match=re.escape("config.resources.gpus: not a setting of this scheduler")
        ):
            controller.declare(spec(scheduler="pbs", resources={"gpus": 4}))
        with pytest.raises(ValueError, match=re.escape("config.resources.queue")):
            controller.declare(spec(scheduler="pbs", resources={"queue": "prod; rm -rf /"}))
        controller.declare(spec(scheduler="pbs", resources={"queue": "prod", "select": "1:ngpus=4"}))
    finally:
        await runner.cleanup()
