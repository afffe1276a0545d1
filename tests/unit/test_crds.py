"""The generated CRDs: up to date, structural, documented, and named so kubectl finds them."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from controllers.api import crd

REPO = Path(__file__).resolve().parents[2]
CRDS = crd.render()
# Short names of built-in Kubernetes resources; a CRD short name equal to one is never reached.
BUILTIN_SHORT_NAMES = {
    "cm", "cs", "csr", "ds", "deploy", "ep", "ev", "hpa", "ing", "limits", "netpol", "no", "ns", "pc", "pdb",
    "po", "pv", "pvc", "quota", "rc", "rs", "sa", "sc", "sts", "svc", "crd", "crds",
}


@functools.cache
def manifests():
    import yaml

    return {name: yaml.safe_load(text) for name, text in CRDS.items()}


def walk(schema: dict, path: str = ""):
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}{{}}")


def test_committed_crds_match_the_models():
    difference = crd.diff(REPO / "crds")
    assert difference == "", f"crds/ is stale; run `cumulo crds`:\n{difference[:4000]}"


def test_every_kind_of_the_design_is_generated():
    kinds = {m["spec"]["names"]["kind"] for m in manifests().values()}
    assert kinds == {
        "Zone", "HostPod", "Cluster", "Host", "StoragePool", "ImageStore", "PhysicalNetwork", "ServiceOffering",
        "DiskOffering", "NetworkOffering", "Template", "VirtualMachine", "Volume", "Snapshot", "Network",
        "PublicIPAddress", "PortForwardingRule", "FirewallRule", "LoadBalancerRule", "SecurityGroup",
        "AffinityGroup", "Quota", "VirtualRouter", "UsageRecord", "VirtualMachineMigration",
    }


@pytest.mark.parametrize("name", sorted(CRDS))
def test_crd_is_structural_and_documented(name):
    manifest = manifests()[name]
    (version,) = manifest["spec"]["versions"]
    schema = version["schema"]["openAPIV3Schema"]
    undocumented, non_structural = [], []
    for path, node in walk(schema):
        scalar_item = path.endswith(("[]", "{}")) and node.get("type") != "object"
        if path and not scalar_item and "description" not in node:
            undocumented.append(path)
        if "$ref" in node or "type" not in node or any(o.get("type") == "null" for o in node.get("anyOf", [])):
            non_structural.append(path or "<root>")
        if node.get("default", "unset") is None:
            non_structural.append(f"{path} (null default)")
    assert not undocumented, f"fields without description: {undocumented}"
    assert not non_structural, f"non-structural nodes: {non_structural}"
    assert version["subresources"] == {"status": {}}
    assert schema["properties"]["status"]["properties"]["conditions"]["x-kubernetes-list-type"] == "map"


@pytest.mark.parametrize("name", sorted(CRDS))
def test_crd_names_and_columns(name):
    names = manifests()[name]["spec"]["names"]
    assert names["categories"] == ["cumulo"]
    assert names["shortNames"], "every kind has a short name"
    assert not set(names["shortNames"]) & BUILTIN_SHORT_NAMES
    columns = manifests()[name]["spec"]["versions"][0]["additionalPrinterColumns"]
    assert any(c["jsonPath"] in (".status.phase", ".status.state") for c in columns)
    assert all(c["jsonPath"].startswith(".") for c in columns)


def test_short_names_are_unique():
    seen = [s for m in manifests().values() for s in m["spec"]["names"]["shortNames"]]
    assert len(seen) == len(set(seen))
