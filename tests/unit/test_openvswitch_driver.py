"""Pure parts of the Open vSwitch backend: how a segment maps onto the label bridge, the datapath rule, and the
ovs-vsctl command lines of the private switches."""

from __future__ import annotations

import pytest

from controllers.api.v1alpha1.network import Segment, guest_bridge
from cumulo import ovs
from hostagent.drivers.network import NetworkError
from hostagent.drivers.network.openvswitch import (
    choose_datapath_type,
    datapath_problem,
    segment_id,
    segment_tag,
)


def segment(uri: str | None, *, label: str = "cloudbr0", bridge: str | None = None,
            vswitch: str = "openvswitch") -> Segment:
    return Segment(vswitch=vswitch, traffic_label=label, broadcast_uri=uri,
                   bridge=bridge if bridge is not None else guest_bridge(vswitch, label, uri))


def test_vlan_segments_are_tags_on_the_label_bridge() -> None:
    assert segment("vlan://100").bridge == "cloudbr0"
    assert segment_tag(segment("vlan://100")) == 100
    assert segment_tag(segment("vlan://4094")) == 4094
    assert segment_tag(segment(None)) is None
    assert segment_id(segment(None)) == "untagged" and segment_id(segment("vlan://7")) == "vlan://7"


@pytest.mark.parametrize("bad, message", [
    (segment("vlan://4095"), "VLAN 4095 is out of range"),
    (segment("vlan://100", bridge="brvlan-100"), "plug into the label bridge 'cloudbr0', not 'brvlan-100'"),
    (segment("vlan://100", vswitch="linuxbridge", bridge="cloudbr0"), "vswitch 'linuxbridge'"),
    (segment("vxlan://5001"), "VXLAN on the openvswitch backend is not supported yet"),
    (segment("vlan://1", label="a-label-too-long", bridge="a-label-too-long"), "not a valid bridge name"),
    (segment("gre://1", bridge="cloudbr0"), "not a broadcast URI"),
])
def test_segments_the_driver_refuses(bad: Segment, message: str) -> None:
    with pytest.raises(NetworkError, match=message.replace("(", r"\(")):
        segment_tag(bad)


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
