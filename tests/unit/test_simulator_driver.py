"""The simulator hypervisor driver, and the pure parts of the libvirt driver."""

from __future__ import annotations

import asyncio

import pytest

from hostagent.drivers.hypervisor import HypervisorDriver, HypervisorError, version_string
from hostagent.drivers.hypervisor.simulator import SimulatedCapacity, SimulatorDriver
from hostagent.faults import Fault, FaultInjector


def test_simulated_host_reports_its_configured_capacity():
    driver = SimulatorDriver(SimulatedCapacity(cpus=8, memory_mib=16384, cpu_speed_mhz=3000), FaultInjector(),
                             version="1.2.3")
    assert isinstance(driver, HypervisorDriver)
    facts = asyncio.run(driver.host_facts())
    assert (facts.cpu_cores, facts.memory_mib, facts.cpu_speed_mhz) == (8, 16384, 3000)
    assert facts.hypervisor_type == "Simulator" and facts.hypervisor_version == "1.2.3"
    assert facts.libvirt_version is None


def test_facts_fault_becomes_a_hypervisor_error_until_removed():
    faults = FaultInjector()
    driver = SimulatorDriver(SimulatedCapacity(), faults, version="1")
    faults.configure({"facts": Fault(fail=True, message="simulated libvirtd crash")})
    with pytest.raises(HypervisorError, match="simulated libvirtd crash"):
        asyncio.run(driver.host_facts())
    faults.configure({})
    assert asyncio.run(driver.host_facts()).cpu_cores == 16


def test_facts_timeout_fault_hangs_for_the_call_timeout():
    faults = FaultInjector({"facts": Fault(timeout=True)})
    driver = SimulatorDriver(SimulatedCapacity(), faults, version="1", call_timeout=0.1)
    with pytest.raises(HypervisorError, match="facts timed out after 0.1s"):
        asyncio.run(driver.host_facts())


def test_version_string():
    assert version_string(9000000) == "9.0.0"
    assert version_string(7002022) == "7.2.22"
    assert version_string(10010001) == "10.10.1"


CAPABILITIES = """<capabilities>
  <host>
    <cpu><arch>x86_64</arch><model>Broadwell</model><topology sockets='1' dies='1' cores='2' threads='1'/>
      <counter name='tsc' frequency='2299998000' scaling='no'/></cpu>
  </host>
  <guest><os_type>hvm</os_type>
    <arch name='x86_64'><domain type='qemu'/><domain type='kvm'/></arch>
  </guest>
  <guest><os_type>hvm</os_type>
    <arch name='i686'><domain type='qemu'/></arch>
  </guest>
</capabilities>"""


def test_parse_capabilities():
    from hostagent.drivers.hypervisor.libvirt import parse_capabilities

    parsed = parse_capabilities(CAPABILITIES)
    assert parsed["cpu_model"] == "Broadwell" and parsed["architecture"] == "x86_64" and parsed["sockets"] == 1
    assert parsed["tsc_mhz"] == 2299
    assert parsed["domain_types"] == {"x86_64": {"qemu", "kvm"}, "i686": {"qemu"}}
    assert parse_capabilities("<capabilities><host/></capabilities>")["domain_types"] == {}
    assert parse_capabilities("<capabilities><host/></capabilities>")["tsc_mhz"] is None


def test_persisted_simulated_host_keeps_domains_and_disks_across_a_new_driver(tmp_path):
    """--sim-persist: a crashed agent's successor finds the domains and disks (as real guests outlive an agent);
    a domain that was shutting down is gone."""
    from hostagent.drivers.hypervisor import DiskDevice, DomainDescription, DomainOwner
    from hostagent.drivers.storage.simulator import SimulatorStorageDriver

    state = str(tmp_path / "simulator" / "h1.json")

    def drivers() -> tuple[SimulatorDriver, SimulatorStorageDriver]:
        sizes: dict[str, int] = {}
        hypervisor = SimulatorDriver(SimulatedCapacity(), FaultInjector(), version="1", disk_sizes=sizes,
                                     state_file=state, stop_seconds=30)
        return hypervisor, SimulatorStorageDriver(FaultInjector(), capacity_bytes=1, disk_sizes=sizes,
                                                  saved=hypervisor.save)

    def description(n: int) -> DomainDescription:
        return DomainDescription(uuid=f"u{n}", name=f"vm{n}", owner=DomainOwner("ns", f"vm{n}", f"u{n}", "h1"),
                                 cpus=1, memory_mib=256, cpu_shares=1024,
                                 disks=(DiskDevice(volume=f"root{n}", path=f"/sim/root{n}", target="vda"),))

    async def first() -> None:
        hypervisor, storage = drivers()
        await storage.create_disk("/sim/root1", 10)
        await storage.create_disk("/sim/root2", 20)
        await hypervisor.start(description(1))
        await hypervisor.start(description(2))
        await hypervisor.shutdown("u2")  # still powering off when the agent dies
        await storage.delete_disk("/sim/root2")
        await hypervisor.close()

    async def second() -> None:
        hypervisor, storage = drivers()
        domains = await hypervisor.domains()
        assert [(d.uuid, d.state, d.owner.name, d.disks[0].path) for d in domains] == [
            ("u1", "running", "vm1", "/sim/root1")]
        assert (await storage.disk_info("/sim/root1")).virtual_size == 10
        assert await storage.disk_info("/sim/root2") is None
        started = await hypervisor.start(description(3))
        assert started.id not in {d.id for d in domains}  # run ids stay unique

    asyncio.run(first())
    asyncio.run(second())
