"""Crash safety: a create burst and a delete storm of guests on simulated hosts while the controller, the agents
and (optionally) kube-apiserver are SIGKILLed and restarted at random points; then the invariants of DESIGN.md
rules 1, 5 and 6 are checked.

The cloud is benchmarks/simcloud.py's (envtest control plane, production controller and agent binaries, the
agents' restricted identity) with ``--agents`` agent processes of ``--hosts-per-agent`` simulated hosts each, an
advanced zone whose physical network hands out VXLAN VNIs and public addresses, and ``--tenants`` namespaces
with one isolated network each (so guest IPs, a VNI, a source NAT PublicIPAddress and a VirtualRouter are
allocated per tenant). The agents run with ``--sim-persist``: a simulated host's domains and disks live in
``<state-dir>/simulator/<host>.json``, so they outlive a killed agent as real guests do, and the harness reads
those files to see which domains run where.

A seed fixes the kill schedule: when (seconds into the burst or the storm) and whom (the controller, an agent
process, kube-apiserver), and how long the victim stays down. The interleavings with the processes' own work
still vary from run to run; a seed that failed once is worth running several times.

Checked while it runs (sampled every ``--sample`` seconds) and at the end:

* no guest has a domain on two hosts;
* no host is over capacity: the guests placed on it (API), its ledger (``status.capacity``) and its domains
  (simulator state) each fit its CPU and memory after overcommit;
* every guest reaches Running after the burst, with exactly one domain, on the host of its placement;
* after the storm (guests deleted, then networks and templates): no VirtualMachine, Volume, PublicIPAddress,
  VirtualRouter, Network or Template is left in the tenants' namespaces and nothing there carries a finalizer (so
  nothing would hold the namespace's deletion up; envtest runs no namespace controller), every PhysicalNetwork
  reports no VNI and no public address allocated, every Host no capacity allocated and no guest, and no
  simulated host keeps a domain or a disk.

    .venv/bin/python benchmarks/chaos.py                      # seed 8: what CI runs, at the CI size
    .venv/bin/python benchmarks/chaos.py --seeds 1-50         # long mode (make chaos)
    .venv/bin/python benchmarks/chaos.py --seeds 7 --vms 200 --kills 8 --apiserver-kills 2 --keep
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import queue
import random
import signal
import sys
import threading
import time
import traceback
import typing as t
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kubernetes import client  # noqa: E402
from kubernetes.client.exceptions import ApiException  # noqa: E402
from urllib3.exceptions import HTTPError  # noqa: E402

from benchmarks.simcloud import GROUP, VERSION, Process, SimCloud, unique  # noqa: E402
from controllers import kinds  # noqa: E402

ISOLATED_SERVICES = ["Dhcp", "Dns", "SourceNat", "StaticNat", "PortForwarding", "Firewall", "Lb", "UserData"]
VM_CPUS, VM_MEMORY_MIB = 1, 256
TENANT_KINDS = ("virtualmachines", "volumes", "publicipaddresses", "virtualrouters", "networks", "templates")
NAMESPACED_KINDS = [kind.plural for kind in kinds.ALL if kind.namespaced and kind.group == GROUP]


CI_SEED = 8
"""tests/integration/test_chaos.py's seed: the controller and two agents killed during the burst, kube-apiserver
while the deletes are in flight and an agent after."""


class InvariantViolation(AssertionError):
    """An invariant did not hold; the message says which, where and when."""


@dataclasses.dataclass
class Kill:
    phase: str          # "burst" or "storm"
    at: float           # seconds into the phase
    victim: str         # "controller", "agent <k>" or "kube-apiserver"
    down: float         # seconds before it is started again

    def __str__(self) -> str:
        return f"{self.phase}+{self.at:.1f}s {self.victim} (down {self.down:.1f}s)"


def schedule(seed: int, *, agents: int, kills: int, apiserver_kills: int, window: float) -> list[Kill]:
    """The seed's kills: process kills spread over both phases, each at a uniform time within ``window``."""
    rng = random.Random(seed)
    victims = ["controller", *(f"agent {k}" for k in range(agents))]
    plan = [Kill(rng.choice(("burst", "storm")), rng.uniform(0, window), rng.choice(victims), rng.uniform(0.2, 3.0))
            for _ in range(kills)]
    plan += [Kill(rng.choice(("burst", "storm")), rng.uniform(0, window), "kube-apiserver", rng.uniform(0.5, 4.0))
             for _ in range(apiserver_kills)]
    return sorted(plan, key=lambda kill: (kill.phase != "burst", kill.at))


def retrying(call: t.Callable[[], t.Any], timeout: float = 90.0) -> t.Any:
    """The harness's own API calls outlast an apiserver restart: connection errors and 5xx are retried."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except ApiException as error:
            if error.status not in (0, 429, 500, 502, 503, 504) or time.monotonic() > deadline:
                raise
        except (HTTPError, OSError):
            if time.monotonic() > deadline:
                raise
        time.sleep(0.5)


class ChaosCloud(SimCloud):
    """A SimCloud with an isolated network per tenant namespace and persisted simulated hosts."""

    def __init__(self, *, seed: int, agents: int, hosts_per_agent: int, cpus_per_host: int, tenants: int,
                 workdir: Path | None = None, keep: bool = False) -> None:
        super().__init__(hosts=agents * hosts_per_agent, hosts_per_agent=hosts_per_agent, cpus_per_host=cpus_per_host,
                         memory_mib=cpus_per_host * VM_MEMORY_MIB * 2, workdir=workdir, keep=keep,
                         agent_args=["--sim-persist", "--heartbeat-interval", "2", "--lease-duration", "20",
                                     "--vm-resync", "5", "--orphan-sweep", "5"])
        self.seed = seed
        self.pnet = unique("pnet")
        self.net_offering = unique("isolated")
        self.tenants = [f"chaos{seed}-t{k}-{self.base[-6:]}" for k in range(tenants)]

    def _infrastructure(self) -> None:
        super()._infrastructure()
        self.create_cluster_object("physicalnetworks", "PhysicalNetwork", self.pnet, {
            "zone": self.zone, "isolationMethod": "VXLAN", "vnetRanges": [{"start": 7000, "end": 7099}],
            "trafficTypes": [{"type": "Guest", "label": "cloudbr0"}, {"type": "Public", "label": "cloudbr1"}],
            "publicIpRanges": [{"cidr": "203.0.113.0/24", "gateway": "203.0.113.1", "startIp": "203.0.113.10",
                                "endIp": "203.0.113.200"}]})
        self.create_cluster_object("networkofferings", "NetworkOffering", self.net_offering, {
            "guestIpType": "Isolated", "services": [{"name": s, "provider": "VirtualRouter"}
                                                    for s in ISOLATED_SERVICES]})
        for tenant in self.tenants:
            client.CoreV1Api(self.api).create_namespace(client.V1Namespace(
                metadata=client.V1ObjectMeta(name=tenant)))
            self.create_object("networks", "Network", "net", {"networkOffering": self.net_offering,
                                                              "zone": self.zone}, namespace=tenant)

    def _template(self) -> None:
        super()._template()
        for tenant in self.tenants:  # a public template would do; one per tenant keeps the namespaces alike
            self.create_object("templates", "Template", "img", {
                "url": "file:///sim/images/img.qcow2", "zone": self.zone, "hypervisor": "Simulator"},
                namespace=tenant)
            self.wait(lambda tenant=tenant: (self.custom.get_namespaced_custom_object(
                GROUP, VERSION, tenant, "templates", "img").get("status") or {}).get("state") == "Ready",
                timeout=60, what=f"the template of {tenant} Ready")

    def vm_spec(self) -> dict:
        return {**super().vm_spec(), "nics": [{"network": {"name": "net"}}]}

    # -- observing -------------------------------------------------------------------------------

    def state_files(self) -> dict[str, Path]:
        return {host: self.workdir / f"{group}-state" / "simulator" / f"{host}.json"
                for group, count in self.groups for host in (f"{group}-{i}" for i in range(count))}

    def simulated(self) -> dict[str, dict]:
        """Each simulated host's domains and disks, as its state file has them."""
        hosts = {}
        for host, path in self.state_files().items():
            try:
                hosts[host] = json.loads(path.read_text())
            except FileNotFoundError:
                hosts[host] = {"domains": [], "disks": {}}
        return hosts

    def list_all(self, plural: str, namespace: str | None = None, retry: bool = True) -> list[dict]:
        """Every object of ``plural`` (of one namespace); ``retry``: through an apiserver restart."""
        if namespace is None:
            call = lambda: self.custom.list_cluster_custom_object(GROUP, VERSION, plural)  # noqa: E731
        else:
            call = lambda: self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, plural)  # noqa: E731
        return (retrying(call) if retry else call())["items"]

    def guests(self, retry: bool = True) -> list[dict]:
        return [vm for tenant in self.tenants for vm in self.list_all("virtualmachines", tenant, retry)]

    # -- processes -------------------------------------------------------------------------------

    def victim(self, name: str) -> Process:
        return self.controller if name == "controller" else self.agents[int(name.split()[1])]

    def crash(self, kill: Kill) -> str:
        """SIGKILL the victim, keep it down ``kill.down`` seconds, start it again; says how it went."""
        if kill.victim == "kube-apiserver":
            self.plane.kill_apiserver()
            time.sleep(kill.down)
            started = time.monotonic()
            self.plane.start_apiserver(timeout=180)
            return f"kube-apiserver ready {time.monotonic() - started:.1f} s after its start"
        process = self.victim(kill.victim)
        process.popen.kill()
        process.popen.wait()
        time.sleep(kill.down)
        fresh = Process(process.name, process.argv, process.log_path)
        if kill.victim == "controller":
            self.controller = fresh
        else:
            self.agents[int(kill.victim.split()[1])] = fresh
        return f"{kill.victim} restarted"


class Sampler:
    """Checks the run-time invariants every ``interval`` seconds from a thread; violations are kept."""

    def __init__(self, cloud: ChaosCloud, interval: float) -> None:
        self.cloud, self.interval = cloud, interval
        self.violations: list[str] = []
        self.samples = 0
        self.max_domains = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.violations += check_running_invariants(self.cloud)
                self.samples += 1
            except Exception:  # an apiserver outage: the next sample tries again
                continue


def check_running_invariants(cloud: ChaosCloud) -> list[str]:
    """No domain on two hosts; no host over capacity (placements, ledger, domains)."""
    now = time.strftime("%H:%M:%S")
    problems = []
    where: dict[str, list[str]] = {}
    domains_per_host: dict[str, int] = {}
    for host, state in cloud.simulated().items():
        active = [d for d in state["domains"] if d["state"] != "stopping"]
        domains_per_host[host] = len(active)
        for domain in active:
            where.setdefault((domain.get("owner") or {}).get("uid") or domain["uuid"], []).append(host)
    for uid, hosts in where.items():
        if len(hosts) > 1:
            problems.append(f"{now} guest {uid} has domains on {sorted(hosts)}")
    # No retries: a sample during an apiserver outage fails fast, the next one is taken 0.5 s later.
    hosts = {h["metadata"]["name"]: h for h in cloud.list_all("hosts", retry=False)
             if h["metadata"]["name"] in domains_per_host}
    placed: dict[str, int] = {}
    for vm in cloud.guests(retry=False):
        host = ((vm.get("status") or {}).get("placement") or {}).get("host")
        if host:
            placed[host] = placed.get(host, 0) + 1
    for name, host in hosts.items():
        capacity = (host.get("status") or {}).get("capacity") or {}
        cpu, memory = capacity.get("cpuCores") or {}, capacity.get("memoryMiB") or {}
        if not cpu.get("total"):
            continue
        slots = min(cpu["total"] // VM_CPUS, memory.get("total", 0) // VM_MEMORY_MIB)
        if cpu.get("allocated", 0) > cpu["total"] or memory.get("allocated", 0) > memory.get("total", 0):
            problems.append(f"{now} host {name} ledger over capacity: cpu {cpu}, memory {memory}")
        if placed.get(name, 0) > slots:
            problems.append(f"{now} host {name}: {placed[name]} guests placed, room for {slots}")
        if domains_per_host.get(name, 0) > slots:
            problems.append(f"{now} host {name}: {domains_per_host[name]} domains, room for {slots}")
    return problems


def check_converged(cloud: ChaosCloud, names: dict[str, list[str]]) -> list[str]:
    """After the burst: every guest Running, with exactly one domain, on the host it is placed on."""
    problems = []
    domains: dict[str, list[str]] = {}
    for host, state in cloud.simulated().items():
        for domain in state["domains"]:
            domains.setdefault(domain["owner"]["uid"], []).append(host)
    for vm in cloud.guests():
        uid, status = vm["metadata"]["uid"], vm.get("status") or {}
        key = f"{vm['metadata']['namespace']}/{vm['metadata']['name']}"
        host = (status.get("placement") or {}).get("host")
        if status.get("phase") != "Running":
            problems.append(f"{key} is {status.get('phase')}: {not_true(status)}")
        elif domains.get(uid) != [host]:
            problems.append(f"{key} placed on {host} has domains on {domains.get(uid)}")
    guests = cloud.guests()
    uids = {vm["metadata"]["uid"] for vm in guests}
    strays = {uid: hosts for uid, hosts in domains.items() if uid not in uids}
    if strays:
        problems.append(f"domains of no guest: {strays}")
    # The ledger holds exactly what is placed: nothing a crash reserved and never released.
    placed: dict[str, int] = {}
    for vm in guests:
        host = ((vm.get("status") or {}).get("placement") or {}).get("host")
        placed[host] = placed.get(host, 0) + 1
    for host in cloud.list_all("hosts"):
        name = host["metadata"]["name"]
        if name not in cloud.host_names:
            continue
        capacity = (host.get("status") or {}).get("capacity") or {}
        allocated = ((capacity.get("cpuCores") or {}).get("allocated", 0),
                     (capacity.get("memoryMiB") or {}).get("allocated", 0))
        wanted = (placed.get(name, 0) * VM_CPUS, placed.get(name, 0) * VM_MEMORY_MIB)
        if allocated != wanted:
            problems.append(f"host {name} ledger allocates {allocated} (CPUs, MiB) for {placed.get(name, 0)} guests")
    return problems


def not_true(status: dict) -> list:
    return [(c["type"], c.get("reason"), c.get("message")) for c in status.get("conditions", [])
            if c.get("status") != "True"]


def leftovers(cloud: ChaosCloud) -> list[str]:
    """After the storm: what is still there (empty when nothing leaked)."""
    problems = []
    for tenant in cloud.tenants:
        for plural in NAMESPACED_KINDS:
            for obj in cloud.list_all(plural, tenant):
                meta = obj["metadata"]
                if plural in TENANT_KINDS or meta.get("finalizers"):  # a finalizer would hold the namespace up
                    problems.append(f"{plural} {tenant}/{meta['name']} left (finalizers {meta.get('finalizers')}, "
                                    f"deleting since {meta.get('deletionTimestamp')}): "
                                    f"{not_true(obj.get('status') or {})}")
    for pnet in cloud.list_all("physicalnetworks"):
        status = pnet.get("status") or {}
        if status.get("vnetsAllocated") or status.get("publicIpsAllocated"):
            problems.append(f"physical network {pnet['metadata']['name']}: {status.get('vnetsAllocated')} VNIs, "
                            f"{status.get('publicIpsAllocated')} public IPs still allocated")
    names = set(cloud.host_names)
    for host in cloud.list_all("hosts"):
        if host["metadata"]["name"] not in names:
            continue
        status = host.get("status") or {}
        capacity = status.get("capacity") or {}
        allocated = {k: (capacity.get(k) or {}).get("allocated") for k in ("cpuCores", "memoryMiB")}
        if any(allocated.values()) or status.get("virtualMachines"):
            problems.append(f"host {host['metadata']['name']}: allocated {allocated}, "
                            f"{status.get('virtualMachines')} guests")
    for host, state in cloud.simulated().items():
        if state["domains"] or state["disks"]:
            problems.append(f"simulated host {host} keeps domains {[d['name'] for d in state['domains']]} "
                            f"and disks {sorted(state['disks'])}")
    return problems


@dataclasses.dataclass
class Result:
    seed: int
    kills: list[Kill]
    burst_seconds: float = 0.0
    storm_seconds: float = 0.0
    samples: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems and self.error is None

    def summary(self) -> str:
        state = "ok" if self.ok else "FAILED"
        lines = [f"seed {self.seed}: {state}; burst converged in {self.burst_seconds:.0f} s, storm in "
                 f"{self.storm_seconds:.0f} s; {self.samples} samples; kills: "
                 + ", ".join(str(kill) for kill in self.kills)]
        lines += [f"  {problem}" for problem in self.problems[:40]]
        if self.error:
            lines.append(f"  error: {self.error}")
        return "\n".join(lines)


class Killer:
    """Runs each phase's kills at their times from the phase's start, from one thread that lives as long as the
    cloud: kube-apiserver is restarted with PR_SET_PDEATHSIG (cumulo.envtest), which Linux delivers when the
    *thread* that started it ends."""

    def __init__(self, cloud: ChaosCloud, plan: list[Kill], log: t.Callable[[str], None]) -> None:
        self.cloud, self.plan, self.log = cloud, plan, log
        self.error: BaseException | None = None
        self._phases: queue.Queue[str | None] = queue.Queue()
        self._done = {phase: threading.Event() for phase in ("burst", "storm")}
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Killer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._phases.put(None)
        self._thread.join(60)

    def begin(self, phase: str) -> None:
        self._phases.put(phase)

    def finish(self, phase: str) -> None:
        """Wait for the phase's kills (and restarts) to be done."""
        self._done[phase].wait()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while (phase := self._phases.get()) is not None:
            started = time.monotonic()
            try:
                for kill in (k for k in self.plan if k.phase == phase):
                    delay = started + kill.at - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    self.log(f"kill {kill}")
                    self.log(f"  {self.cloud.crash(kill)}")
            except BaseException as error:  # noqa: BLE001 (raised by finish)
                self.error = error
            self._done[phase].set()
        # Stay alive until the cloud is stopped: a kube-apiserver started here dies with this thread.


def wait(check: t.Callable[[], list[str]], timeout: float, what: str,
         log: t.Callable[[str], None] = print) -> list[str]:
    """Poll ``check`` (a list of problems) until it is empty; the last problems on timeout. Every 15 s the
    first problem is logged (what a slow convergence waits for)."""
    started = time.monotonic()
    problems = ["not checked"]
    said = started
    while time.monotonic() - started < timeout:
        try:
            problems = check()
        except (ApiException, HTTPError, OSError) as error:
            problems = [f"{what}: {error}"]
        if not problems:
            return []
        if time.monotonic() - said > 15:
            said = time.monotonic()
            log(f"  {said - started:.0f} s, {what}: {len(problems)} problems, e.g. {problems[0][:300]}")
        time.sleep(1.0)
    return [f"{what}, after {timeout:.0f} s:", *problems]


def run_seed(seed: int, *, vms: int = 100, agents: int = 3, hosts_per_agent: int = 4, tenants: int = 4,
             kills: int = 4, apiserver_kills: int = 1, window: float = 20.0, headroom: float = 1.15,
             timeout: float = 240.0, sample: float = 0.5, workdir: Path | None = None, keep: bool = False,
             log: t.Callable[[str], None] = print) -> Result:
    hosts = agents * hosts_per_agent
    cpus = max(1, -(-int(vms * headroom) // hosts))
    plan = schedule(seed, agents=agents, kills=kills, apiserver_kills=apiserver_kills, window=window)
    result = Result(seed, plan)
    log(f"seed {seed} ({workdir or 'a temporary directory'}): {vms} guests on {hosts} hosts of {cpus} CPUs ({agents} agents), {tenants} tenants; kills: "
        + ", ".join(map(str, plan)))
    with ChaosCloud(seed=seed, agents=agents, hosts_per_agent=hosts_per_agent, cpus_per_host=cpus, tenants=tenants,
                    workdir=workdir, keep=keep) as cloud:
        names = {tenant: [f"vm-{i:03d}" for i in range(vms) if i % tenants == k]
                 for k, tenant in enumerate(cloud.tenants)}
        try:
            with Killer(cloud, plan, log) as killer, Sampler(cloud, sample) as sampler:
                # The burst: every guest at once, the burst's kills meanwhile.
                started = time.monotonic()
                killer.begin("burst")

                def create(item: tuple[str, str]) -> None:
                    tenant, name = item
                    try:
                        retrying(lambda: cloud.create_object("virtualmachines", "VirtualMachine", name,
                                                             cloud.vm_spec(), namespace=tenant))
                    except ApiException as error:
                        if error.status != 409:  # created before the connection broke
                            raise

                with concurrent.futures.ThreadPoolExecutor(16) as pool:
                    list(pool.map(create, [(tenant, name) for tenant, ns in names.items() for name in ns]))
                killer.finish("burst")
                result.problems += wait(lambda: check_converged(cloud, names), timeout, "guests not converged",
                                        log)
                result.burst_seconds = time.monotonic() - started
                log(f"burst: converged after {result.burst_seconds:.0f} s" if not result.problems else
                    "burst: not converged")

                # The storm: delete every guest, then the networks, the storm's kills meanwhile.
                started = time.monotonic()
                killer.begin("storm")

                def delete(item: tuple[str, str, str]) -> None:
                    tenant, plural, name = item
                    with contextlib.suppress(ApiException):
                        retrying(lambda: cloud.custom.delete_namespaced_custom_object(GROUP, VERSION, tenant,
                                                                                       plural, name))

                with concurrent.futures.ThreadPoolExecutor(16) as pool:
                    list(pool.map(delete, [(tenant, "virtualmachines", name) for tenant, ns in names.items()
                                           for name in ns]))
                result.problems += wait(lambda: [f"{len(cloud.guests())} guests left"] if cloud.guests() else [],
                                        timeout, "guests not deleted", log)
                result.problems += wait(lambda: [
                    f"network {tenant}/net: {(net.get('status') or {}).get('ipsAllocated')} guest IPs allocated"
                    for tenant in cloud.tenants for net in cloud.list_all("networks", tenant)
                    if (net.get("status") or {}).get("ipsAllocated")], timeout, "guest IPs not released", log)
                log(f"storm: guests gone, their IPs released after {time.monotonic() - started:.0f} s; deleting the "
                    "networks and templates")
                with concurrent.futures.ThreadPoolExecutor(4) as pool:
                    list(pool.map(delete, [(tenant, plural, name) for tenant in cloud.tenants
                                           for plural, name in (("networks", "net"), ("templates", "img"))]))
                killer.finish("storm")
                result.problems += wait(lambda: leftovers(cloud), timeout, "leaked after the storm", log)
                result.storm_seconds = time.monotonic() - started
                log(f"storm: nothing left after {result.storm_seconds:.0f} s")
            result.samples = sampler.samples
            result.problems = sorted(set(sampler.violations)) + result.problems
        except Exception as error:
            result.error = f"{type(error).__name__}: {error}\n{traceback.format_exc()[-2000:]}"
        if not result.ok:
            keep_logs(cloud, log)
    return result


def keep_logs(cloud: ChaosCloud, log: t.Callable[[str], None]) -> None:
    for process in (cloud.controller, *cloud.agents):
        if process is not None:
            errors = [line for line in process.log().splitlines() if "Traceback" in line or "ERROR" in line
                      or '"error"' in line]
            log(f"--- {process.name} ({process.log_path}): {len(errors)} error lines; last:\n"
                + "\n".join(line[:300] for line in errors[-5:]))


def parse_seeds(text: str) -> list[int]:
    seeds: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        seeds += range(int(first), int(last or first) + 1)
    return seeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default=str(CI_SEED), help="e.g. 8, 1-50 or 3,7,9 (default: the CI seed)")
    parser.add_argument("--vms", type=int, default=100)
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--hosts-per-agent", type=int, default=4)
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--kills", type=int, default=4, help="controller/agent SIGKILLs per seed")
    parser.add_argument("--apiserver-kills", type=int, default=1, help="kube-apiserver SIGKILLs per seed")
    parser.add_argument("--window", type=float, default=20.0, help="kills fall within this many seconds of a phase")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds to converge after each phase")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, state files)")
    args = parser.parse_args(argv)

    def interrupted(signum: int, frame: t.Any) -> None:
        raise KeyboardInterrupt  # SIGTERM too: the cloud of the current seed is stopped on the way out

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)  # a background job's SIGINT is ignored unless handled
    results = []
    try:
        for seed in parse_seeds(args.seeds):
            started = time.monotonic()
            result = run_seed(seed, vms=args.vms, agents=args.agents, hosts_per_agent=args.hosts_per_agent,
                              tenants=args.tenants, kills=args.kills, apiserver_kills=args.apiserver_kills,
                              window=args.window, timeout=args.timeout, keep=args.keep)
            print(result.summary() + f" [{time.monotonic() - started:.0f} s]", flush=True)
            results.append(result)
    except KeyboardInterrupt:
        print("interrupted; the seed under way is not counted")
    failed = [r.seed for r in results if not r.ok]
    print(f"{len(results)} seeds, {len(failed)} failed" + (f": {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
