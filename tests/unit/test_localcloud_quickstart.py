"""Pure parts of `make up` (cumulo.localcloud): what it reads from the quickstart, the lab's record, and which part
of a guest's console log counts as its current boot."""

from __future__ import annotations

import datetime
from pathlib import Path

from cumulo import localcloud


def test_the_quickstart_names_hosts_guest_public_ip_and_gateway() -> None:
    quickstart = localcloud.Quickstart.read(localcloud.QUICKSTART)
    assert quickstart.hosts == ["host1", "host2"]
    assert quickstart.vms == [("demo", "demo-vm")]
    assert quickstart.public_ips == [("demo", "demo-web")]
    assert quickstart.firewall_rules == [("demo", "demo-web-http")]
    assert quickstart.public_gateway == "203.0.113.1/24"


def test_lab_prefix_is_fixed_per_state_directory_and_fits_netlab() -> None:
    one, other = localcloud.Layout(Path("/work/main/.cumulo")), localcloud.Layout(Path("/tmp/x/cloud"))
    assert one.lab_prefix == localcloud.Layout(Path("/work/main/.cumulo")).lab_prefix != other.lab_prefix
    assert len(one.lab_prefix) <= 6 and one.lab_prefix.isalnum()
    lab = localcloud.Lab(one.lab_prefix, {"host1": f"{one.lab_prefix}-host1"}, f"{one.lab_prefix}-pub")
    assert localcloud.Lab.from_json(lab.to_json()) == lab
    assert localcloud.Lab.from_json(None) is None and localcloud.Lab.from_json({"hosts": {}}) is None


def stamp(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_only_the_latest_boot_counts() -> None:
    first, second = 1_800_000_000, 1_800_000_100
    console = (f"\n[cumulo-agent {stamp(first)}] starting domain d on host host1\nCUMULO ip eth0 10.1.1.2\n"
               f"\n[cumulo-agent {stamp(second)}] starting domain d on host host1\nbooting\n")
    assert "10.1.1.2" not in localcloud._current_boot(console, None)
    assert localcloud._current_boot(console, None).strip() == "booting"
    # A hypervisor restarted after the last start: that start's guest is gone, nothing counts yet.
    assert localcloud._current_boot(console, second + 5) == ""
    assert localcloud._current_boot(console, second).strip() == "booting"
    assert localcloud._current_boot("no start line\n", None) == "no start line\n"
    assert localcloud._current_boot("no start line\n", first) == ""
