"""The Linux bridge driver's pure planning: names, multicast groups, refusals."""

from __future__ import annotations

import pytest

from controllers.api.v1alpha1.network import Segment, guest_bridge
from hostagent.drivers.network import NetworkError
from hostagent.drivers.network.linuxbridge import plan_segment, vxlan_multicast_group


def segment(uri: str | None, label: str = "cloudbr0", mtu: int = 1450, vswitch: str = "linuxbridge") -> Segment:
    return Segment(vswitch=vswitch, traffic_label=label, broadcast_uri=uri, bridge=guest_bridge(vswitch, label, uri),
                   mtu=mtu)


@pytest.mark.parametrize("vni,group", [(1, "239.0.0.1"), (5001, "239.0.19.137"), (0xABCDEF, "239.171.205.239"),
                                       (16777215, "239.255.255.255")])
def test_multicast_group_from_vni(vni: int, group: str) -> None:
    assert vxlan_multicast_group(vni) == group


def test_vxlan_plan() -> None:
    plan = plan_segment(segment("vxlan://5001"))
    assert (plan.bridge, plan.label, plan.kind, plan.device, plan.vnet, plan.group, plan.mtu) == (
        "brvx-5001", "cloudbr0", "vxlan", "vxlan5001", 5001, "239.0.19.137", 1450)
    assert plan.owned


def test_vlan_plan() -> None:
    plan = plan_segment(segment("vlan://100", mtu=1500))
    assert (plan.bridge, plan.kind, plan.device, plan.vnet) == ("brvlan-100", "vlan", "cloudbr0.100", 100)


def test_untagged_plan_is_the_label_bridge() -> None:
    plan = plan_segment(segment(None, label="cloudbr1", mtu=1500))
    assert (plan.bridge, plan.kind, plan.device) == ("cloudbr1", None, None)
    assert not plan.owned


@pytest.mark.parametrize("bad,message", [
    (segment("vxlan://5", vswitch="openvswitch"), "vswitch 'openvswitch'"),
    (Segment(traffic_label="cloudbr0", broadcast_uri="vxlan://5", bridge="cloudbr0"), "its own bridge"),
    (Segment(traffic_label="cloudbr0", broadcast_uri=None, bridge="brvx-5"), "label bridge 'cloudbr0'"),
    (segment("vlan://4095"), "out of range"),
    (segment("vlan://100", label="averylonglabel"), "exceed 15"),
    (Segment(traffic_label="cloudbr0", broadcast_uri="gre://5", bridge="x"), "not a broadcast URI"),
])
def test_refusals(bad: Segment, message: str) -> None:
    with pytest.raises(NetworkError, match=message):
        plan_segment(bad)
