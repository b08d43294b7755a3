"""The documents hold: every relative link reaches a file of the repository, the adaptor contract
names every part of the `adaptors` package, and its minimal example loads and answers."""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import sys
from pathlib import Path

import pytest

import adaptors
from adaptors import BaseCluster, BaseEndpoint
from proxy.core.registry import load_registry
from proxy.settings import ConfigError
from tests.support import write_yaml

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)]*)?\)")
CONTRACT = ROOT / "docs" / "adaptor-contract.md"


def test_relative_links_reach_files_of_the_repository() -> None:
    broken = []
    for document in DOCUMENTS:
        text = document.read_text()
        for target, _ in LINK.findall(text):
            if re.match(r"^[a-z]+:", target):
                continue
            resolved = (document.parent / target).resolve()
            if not resolved.exists() or ROOT not in resolved.parents:
                broken.append(f"{document.relative_to(ROOT)}: {target}")
        if "shared/spec" in text:
            broken.append(f"{document.relative_to(ROOT)}: names a document that is not shipped")
    assert broken == []


def test_the_contract_names_every_part_of_the_adaptors_package() -> None:
    text = CONTRACT.read_text()
    names = list(adaptors.__all__)
    for base in (BaseEndpoint, BaseCluster):
        names += [
            name for name, _ in inspect.getmembers(base, inspect.isfunction) if not name.startswith("_")
        ]
        names += list(inspect.signature(base.__init__).parameters)[1:]
    assert [name for name in names if not re.search(rf"`[^`]*\b{name}\b[^`]*`", text)] == []


def test_the_contracts_examples_load_and_answer(tmp_path: Path) -> None:
    """Its minimal endpoint on the configured base, and the same written the old way."""
    text = CONTRACT.read_text()
    code = "\n\n".join(
        re.findall(r"```python\n(.*?)```", text[text.index("## A minimal endpoint") :], re.DOTALL)
    )
    package = tmp_path / "contract_example"
    package.mkdir()
    (package / "__init__.py").write_text(code)
    clusters = [{"cluster_name": "c", "cluster_adapter": "examples.site_adaptors.echo.EchoCluster",
                 "frameworks": ["f"], "openai_endpoints": ["chat/completions"]}]  # fmt: skip
    write_yaml(tmp_path / "clusters.yaml", clusters)

    def load(config: dict[str, str]) -> list[BaseEndpoint]:
        endpoints = [
            {"cluster": "c", "framework": "f", "model": name, "endpoint_adapter": f"contract_example.{name}",
             "config": config}
            for name in ("Constant", "ConstantOldWay")
        ]  # fmt: skip
        write_yaml(tmp_path / "endpoints.yaml", endpoints)
        return list(load_registry(tmp_path / "endpoints.yaml", tmp_path / "clusters.yaml").endpoints.values())

    sys.path.insert(0, str(tmp_path))
    try:
        served = load({"text": "hi"})
        with pytest.raises(ConfigError, match=r"field 'config\.txt': Extra inputs are not permitted"):
            load({"txt": "hi"})
    finally:
        sys.path.remove(str(tmp_path))
    assert len(served) == 2
    for endpoint in served:
        answer = asyncio.run(endpoint.submit_task({"model_params": {"openai_endpoint": "chat/completions"}}))
        assert json.loads(answer.result or "")["choices"][0]["message"]["content"] == "hi"
