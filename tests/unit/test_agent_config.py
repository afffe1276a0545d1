"""Command line, host names and configuration checks of cumulo-agent (hostagent.config, hostagent.main)."""

from __future__ import annotations

import pytest

from hostagent.config import AgentConfig, ConfigError, resolve_host_name, simulated_host_names
from hostagent.faults import Fault
from hostagent.main import build_config, parser


def test_host_flag_wins_over_environment():
    assert resolve_host_name("h1", {"CUMULO_HOST": "h2", "NODE_NAME": "h3"}, "machine") == "h1"


def test_cumulo_host_then_node_name_then_machine_name():
    assert resolve_host_name(None, {"CUMULO_HOST": "h2", "NODE_NAME": "h3"}, "machine") == "h2"
    assert resolve_host_name(None, {"NODE_NAME": "h3"}, "machine") == "h3"
    assert resolve_host_name(None, {}, "Machine.example.com") == "machine"


@pytest.mark.parametrize("bad", ["Upper", "under_score", "-dash", "x" * 254])
def test_invalid_names_are_refused_with_their_source(bad):
    with pytest.raises(ConfigError, match=r"not a valid Kubernetes object name") as caught:
        resolve_host_name(None, {"CUMULO_HOST": bad})
    assert "$CUMULO_HOST" in str(caught.value)


def test_simulated_names():
    assert simulated_host_names("sim", 3) == ["sim-0", "sim-1", "sim-2"]
    with pytest.raises(ConfigError, match="at least 1"):
        simulated_host_names("sim", 0)


def config_from(*args: str, environ=None) -> AgentConfig:
    return build_config(parser().parse_args(list(args)), environ or {})


def test_libvirt_defaults():
    config = config_from("--host", "kvm1")
    assert config.hosts == ["kvm1"]
    assert (config.hypervisor, config.virt_type, config.libvirt_uri) == ("libvirt", "qemu", "qemu:///system")
    assert (config.network_driver, config.storage_driver) == ("linuxbridge", "filesystem")
    assert (config.heartbeat_interval, config.lease_duration, config.check_interval) == (10.0, 40, 10.0)


def test_simulator_with_many_hosts_and_faults():
    config = config_from("--host", "sim", "--hypervisor", "simulator", "--simulate", "2", "--sim-cpus", "8",
                         "--fault", 'facts={"fail": true}', "--heartbeat-interval", "1", "--lease-duration", "5")
    assert config.hosts == ["sim-0", "sim-1"]
    assert (config.network_driver, config.storage_driver) == ("simulator", "simulator")
    assert config.simulated.cpus == 8
    assert config.faults == {"facts": Fault(fail=True)}
    assert config.check_interval == 1.0


def test_netns_guests_with_real_networking():
    config = config_from("--host", "h1", "--hypervisor", "netns", "--host-netns", "lab-h1")
    assert (config.hypervisor, config.host_netns) == ("netns", "lab-h1")
    assert (config.network_driver, config.storage_driver) == ("linuxbridge", "simulator")


@pytest.mark.parametrize("args, error", [
    (["--simulate", "2"], "--simulate needs --hypervisor simulator"),
    (["--fault", 'facts={"fail": true}'], "--fault is for the simulator"),
    (["--hypervisor", "simulator", "--fault", "facts"], "OPERATION=JSON"),
    (["--heartbeat-interval", "30"], "at least twice"),
])
def test_configuration_errors(args, error):
    with pytest.raises(ConfigError, match=error):
        config_from("--host", "h", *args)
