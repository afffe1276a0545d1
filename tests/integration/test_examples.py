"""The manifests in examples/ are accepted by the real apiserver, and the API is discoverable with kubectl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from controllers.api import crd
from controllers.api.v1alpha1 import GROUP, VirtualMachine
from cumulo import envtest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
EXAMPLE_DIRS = sorted(path for path in EXAMPLES.iterdir() if path.is_dir() and any(path.glob("*.yaml")))


def documents(directory: Path) -> list[dict]:
    return [doc for path in sorted(directory.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def identity(obj: dict) -> tuple[str, str, str]:
    return obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"]


def words(text: str) -> str:
    """``text`` with every run of whitespace made one space (kubectl explain wraps descriptions)."""
    return " ".join(text.split())


def test_there_are_examples() -> None:
    assert {path.name for path in EXAMPLE_DIRS} >= {"quickstart", "basic-zone"}


@pytest.fixture(scope="module")
def applied(control_plane: envtest.ControlPlane) -> dict[str, list[dict]]:
    """Every example directory applied, file by file in name order, as `make up` and the READMEs do."""
    result = {}
    for directory in EXAMPLE_DIRS:
        for path in sorted(directory.glob("*.yaml")):
            outcome = control_plane.kubectl("apply", "--server-side", "-f", str(path), check=False)
            assert outcome.returncode == 0, f"{path.relative_to(REPO)} was refused:\n{outcome.stderr}"
        result[directory.name] = documents(directory)
    return result


@pytest.mark.parametrize("example", [path.name for path in EXAMPLE_DIRS])
def test_example_is_listed_by_get_cumulo(control_plane: envtest.ControlPlane, applied: dict[str, list[dict]],
                                         example: str) -> None:
    expected = {identity(doc) for doc in applied[example] if doc["apiVersion"].startswith(f"{GROUP}/")}
    assert expected, f"{example} holds no Cumulo objects"

    listed = json.loads(control_plane.kubectl("get", "cumulo", "-A", "-o", "json").stdout)["items"]
    missing = expected - {identity(item) for item in listed}
    assert not missing, f"kubectl get cumulo -A does not list {sorted(missing)}"

    table = control_plane.kubectl("get", "cumulo", "-A").stdout
    for _, _, name in expected:
        assert name in table


@pytest.mark.parametrize("example", [path.name for path in EXAMPLE_DIRS])
def test_example_numbered_files(example: str) -> None:
    names = sorted(path.name for path in (EXAMPLES / example).glob("*.yaml"))
    assert names[0] == "00-namespace.yaml"
    assert all(name[:2].isdigit() and name[2] == "-" for name in names), names
    assert (EXAMPLES / example / "README.md").is_file()


def test_explain_shows_field_descriptions(control_plane: envtest.ControlPlane) -> None:
    output = words(control_plane.kubectl("explain", "virtualmachine.spec").stdout)
    spec_model = VirtualMachine.model_fields["spec"].annotation
    offering = spec_model.model_fields["service_offering"].description
    assert offering and words(offering) in output
    for field in spec_model.model_fields.values():
        assert field.alias in output, f"{field.alias} missing from kubectl explain virtualmachine.spec"
        assert field.description and words(field.description) in output, field.alias


def test_api_resources_lists_every_kind(control_plane: envtest.ControlPlane) -> None:
    kinds = {resource.kind for resource in crd.registry()}
    resources = {f"{resource.plural_name}.{GROUP}" for resource in crd.registry()}
    # 22 CloudStack kinds + VirtualRouter (the router a Network resolves to) + UsageRecord + VirtualMachineMigration
    assert len(kinds) == 25

    names = control_plane.kubectl("api-resources", "--categories", crd.CATEGORY, "-o", "name").stdout.split()
    assert sorted(names) == sorted(resources)

    table = control_plane.kubectl("api-resources", "--categories", crd.CATEGORY).stdout.splitlines()
    assert table[0].split()[0] == "NAME" and table[0].split()[-1] == "KIND"
    assert {line.split()[-1] for line in table[1:] if line.strip()} == kinds
