"""The hypervisor driver interface: what the agent asks of the hypervisor on its host.

Implementations: :mod:`.libvirt` (a real libvirtd, QEMU/KVM or TCG) and :mod:`.simulator`
(configured capacity, fault injection; CloudStack's Simulator hypervisor). Every method is a
coroutine: the libvirt driver runs its blocking calls in a thread, the simulator sleeps for
injected latency without blocking the other simulated hosts of the process.

The VM issue extends the Protocol with domain operations (``list_domains``, ``define``, ``start``,
``stop``, ``migrate``…); each takes the fully resolved description from the controller
(DESIGN.md §3 "resolved hand-off") and raises :class:`HypervisorError` with a message fit for a
condition.
"""

from __future__ import annotations

import dataclasses
import typing as t

from controllers.api.v1alpha1.common import HypervisorType


class HypervisorError(Exception):
    """A hypervisor call failed; the message is reported as the host's hypervisor error."""


@dataclasses.dataclass(frozen=True)
class HostFacts:
    """What the hypervisor says about the host; the agent reports it in ``status.node``."""

    hypervisor_type: HypervisorType
    hypervisor_version: str | None = None
    libvirt_version: str | None = None
    virt_type: str | None = None
    cpu_model: str | None = None
    cpu_sockets: int | None = None
    cpu_cores: int | None = None
    cpu_speed_mhz: int | None = None
    memory_mib: int | None = None
    architecture: str | None = None


@t.runtime_checkable
class HypervisorDriver(t.Protocol):
    """One host's hypervisor."""

    hypervisor_type: HypervisorType

    async def host_facts(self) -> HostFacts:
        """CPU, memory and versions of the host. Raises :class:`HypervisorError`."""
        ...

    async def close(self) -> None:
        """Release connections; the driver is not used afterwards."""
        ...


def version_string(version: int) -> str:
    """libvirt's packed version number (major * 1,000,000 + minor * 1,000 + release) as ``a.b.c``."""
    return f"{version // 1_000_000}.{version // 1_000 % 1_000}.{version % 1_000}"
