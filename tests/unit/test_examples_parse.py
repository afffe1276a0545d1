"""Every Cumulo object under examples/ parses with the API models (the models and examples agree)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from controllers.api import crd

REGISTRY = crd.registry()
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DOCUMENTS = [
    pytest.param(doc, id=f"{path.parent.name}/{path.name}:{doc['kind']}/{doc['metadata']['name']}")
    for path in sorted(EXAMPLES.rglob("*.yaml"))
    for doc in yaml.safe_load_all(path.read_text())
    if doc and doc.get("apiVersion", "").startswith("cumulo.io/")
]


def test_there_are_examples():
    assert len(DOCUMENTS) >= 20


@pytest.mark.parametrize("document", DOCUMENTS)
def test_example_parses_with_its_model(document):
    model = REGISTRY.get_model_instance(document)
    assert model.metadata.name == document["metadata"]["name"]
    assert model.spec.model_dump(exclude_unset=True, by_alias=True).keys() <= document["spec"].keys()
