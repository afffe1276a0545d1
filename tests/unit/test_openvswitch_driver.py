"""Pure parts of the Open vSwitch backend: how a segment maps onto the label bridge, the datapath rule, and the
ovs-vsctl command lines of the private switches."""

from __future__ import annotations

import pytest

from controllers.api.v1alpha1.network import Segment, guest_bridge
from cumulo import ovs
from hostagent.drivers.network import NetworkError
from hostagent.drivers.network.linuxbridge import vxlan_multicast_group
from hostagent.drivers.network.openvswitch import (
    SegmentPlan,
    choose_datapath_type,
    datapath_problem,
    plan_segment,
)


def segment(uri: str | None, *, label: str = "cloudbr0", bridge: str | None = None,
            vswitch: str = "openvswitch") -> Segment:
    return Segment(vswitch=vswitch, traffic_label=label, broadcast_uri=uri,
                   bridge=bridge if bridge is not None else guest_bridge(vswitch, label, uri))


def test_vlan_segments_are_tags_on_the_label_bridge() -> None:
    assert segment("vlan://100").bridge == "cloudbr0"
    assert plan_segment(segment("vlan://100")) == SegmentPlan(id="vlan://100", label="cloudbr0", bridge="cloudbr0",
                                                              tag=100)
    assert plan_segment(segment("vlan://4094")).tag == 4094
    untagged = plan_segment(segment(None))
    assert untagged == SegmentPlan(id="untagged", label="cloudbr0", bridge="cloudbr0") and not untagged.owned


def test_vxlan_segments_get_a_bridge_and_kernel_device_of_their_own() -> None:
    plan = plan_segment(segment("vxlan://5001"))
    assert plan == SegmentPlan(id="vxlan://5001", label="cloudbr0", bridge="brvx-5001", vni=5001,
                               device="vxlan5001", group="239.0.19.137")
    assert plan.group == vxlan_multicast_group(5001) and plan.owned  # the same group as Linux bridge hosts
    assert segment("vxlan://5001").bridge == "brvx-5001"
    assert plan_segment(segment("vxlan://5001", bridge="cloudbr0")).bridge == "brvx-5001"  # objects of before
    assert len(plan_segment(segment("vxlan://16777215")).device or "") <= 15


@pytest.mark.parametrize("bad, message", [
    (segment("vlan://4095"), "VLAN 4095 is out of range"),
    (segment("vlan://100", bridge="brvlan-100"), "plug into the label bridge 'cloudbr0', not 'brvlan-100'"),
    (segment("vlan://100", vswitch="linuxbridge", bridge="cloudbr0"), "vswitch 'linuxbridge'"),
    (segment("vxlan://5001", bridge="brvx-7"), "plugs into 'brvx-5001', not 'brvx-7'"),
    (segment("vxlan://16777216"), "VNI 16777216 is out of range"),
    (segment("vlan://1", label="a-label-too-long", bridge="a-label-too-long"), "not a valid bridge name"),
    (segment("gre://1", bridge="cloudbr0"), "not a broadcast URI"),
])
def test_segments_the_driver_refuses(bad: Segment, message: str) -> None:
    with pytest.raises(NetworkError, match=message.replace("(", r"\(")):
        plan_segment(bad)


def test_datapath_choice_prefers_the_kernel_where_it_exists() -> None:
    assert choose_datapath_type(["netdev", "system"], kernel_datapath=True) == "system"
    # ovs-vswitchd lists system whenever it was built with it, module or not
    assert choose_datapath_type(["netdev", "system"], kernel_datapath=False) == "netdev"
    with pytest.raises(NetworkError, match="no usable datapath"):
        choose_datapath_type(["system"], kernel_datapath=False)


def test_datapath_problems_name_the_bridge_and_the_fix() -> None:
    assert datapath_problem("cloudbr0", "netdev", ["netdev", "system"], kernel_datapath=False) is None
    assert datapath_problem("cloudbr0", "", ["netdev", "system"], kernel_datapath=True) is None
    problem = datapath_problem("cloudbr0", "", ["netdev", "system"], kernel_datapath=False)
    assert problem is not None and "kernel datapath (system)" in problem and "datapath_type=netdev" in problem
    problem = datapath_problem("cloudbr0", "dpdk", ["netdev", "system"], kernel_datapath=True)
    assert problem == "bridge 'cloudbr0' uses datapath 'dpdk', which this ovs-vswitchd does not offer"


def test_vsctl_command_lines() -> None:
    assert ovs.vsctl_argv("unix:/x/db.sock", "list-br") == [
        "ovs-vsctl", "--db=unix:/x/db.sock", f"--timeout={ovs.VSCTL_TIMEOUT}", "list-br"]
    assert ovs.vsctl_argv("unix:/x/db.sock", "init", wait=False)[-2:] == ["--no-wait", "init"]


def test_private_switch_paths(tmp_path) -> None:
    switch = ovs.PrivateOpenVSwitch("h1", tmp_path)
    assert switch.db_url == f"unix:{tmp_path}/db.sock"
    assert switch.env["OVS_RUNDIR"] == switch.env["OVS_DBDIR"] == switch.env["OVS_LOGDIR"] == str(tmp_path)
    assert not switch.running
    with pytest.raises(ValueError, match="too long for a Unix socket path"):
        ovs.PrivateOpenVSwitch("h1", "/" + "x" * 120)


def test_libvirt_interface_of_an_open_vswitch_nic() -> None:
    import xml.etree.ElementTree as ET

    from hostagent.drivers.hypervisor import NicDevice
    from hostagent.drivers.hypervisor.domainxml import AGENT_PLUGGED, interface_element

    nic = NicDevice(mac="02:00:00:00:00:31", segment=segment("vlan://100"), device_id=0, port="vn1234abcd0")
    element = interface_element(nic)
    assert element.get("type") == "ethernet"  # libvirt makes the tap; the agent plugs it with the tag
    assert element.find("virtualport") is None and element.find("source") is None
    assert element.find("target").get("dev") == "vn1234abcd0"
    assert element.find("mac").get("address") == "02:00:00:00:00:31"
    host = element.find("driver/host")
    assert host is not None and host.get("csum") == host.get("tso4") == host.get("gso") == "off"
    assert "openvswitch" in AGENT_PLUGGED and "linuxbridge" not in AGENT_PLUGGED
    assert ET.tostring(element, encoding="unicode").startswith('<interface type="ethernet">')
