"""The Helm chart's static parts: its CRDs are the generated ones and the controller's ClusterRole covers every kind
the controller watches. values.schema.json is checked by helm's own validator (the one users meet), with lint,
rendering and the apiserver's validation of every object, in tests/integration/test_chart.py."""

from __future__ import annotations

from pathlib import Path

import yaml

from controllers import kinds

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "cumulo"


def test_chart_crds_are_the_generated_crds():
    """Byte for byte the files of crds/ (which test_crds.py holds to the models); `cumulo crds` writes both."""
    chart = {path.name: path.read_text() for path in (CHART / "crds").glob("*.yaml")}
    generated = {path.name: path.read_text() for path in (REPO / "crds").glob("*.yaml")}
    assert sorted(chart) == sorted(generated), "charts/cumulo/crds differs from crds/; run `cumulo crds` (writes both)"
    stale = [name for name in chart if chart[name] != generated[name]]
    assert not stale, f"charts/cumulo/crds is stale ({', '.join(stale)}); run `cumulo crds` (it writes both)"


def test_the_controller_role_covers_every_kind_it_watches():
    role = yaml.safe_load((CHART / "templates" / "controller-rbac.yaml").read_text().split("---")[0]
                          .split("\n", 1)[1].replace("{{- include \"cumulo.labels\" . | nindent 4 }}", ""))

    def allowed(group: str, resource: str, verb: str) -> bool:
        return any(group in rule["apiGroups"] and (resource in rule["resources"] or "*" in rule["resources"])
                   and verb in rule["verbs"] for rule in role["rules"])

    for kind in kinds.ALL:
        for verb in ("list", "watch"):
            assert allowed(kind.group, kind.plural, verb), f"{verb} {kind.plural}.{kind.group} missing"
