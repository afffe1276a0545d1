import random

from controllers.api.v1alpha1.zone import AllocationAlgorithm
from controllers.planner import AffinityRule, HostCandidate, Inventory, Ledger, PoolCandidate, Request
from controllers.planner import plan as plan_on

GIB = 2**30


def host(name, cpu=4, memory=4096, **kw):
    defaults = dict(zone="z1", pod="p1", cluster="c1", hypervisor="KVM", tags=frozenset())
    defaults.update(kw)
    return HostCandidate(name=name, cpu_total=cpu, memory_total_mib=memory, **defaults)


def local_pool(host_name, capacity=100 * GIB, allocated=0, tags=frozenset()):
    return PoolCandidate(f"{host_name}-local", "Host", host_name, tags, True, frozenset({host_name}), capacity,
                         allocated, True)


def request(name="demo/vm", cpu=1, memory=512, **kw):
    defaults = dict(owner="demo", zone="z1", hypervisor="KVM", storage_type="local", disk_bytes=GIB)
    defaults.update(kw)
    return Request(key=name, cpu=cpu, memory_mib=memory, **defaults)


def plan(request, hosts, pools, ledger, *args):
    return plan_on(request, Inventory(hosts, pools), ledger, *args)


HOSTS = [host("h1"), host("h2")]
POOLS = [local_pool("h1"), local_pool("h2")]


def test_first_fit_fills_the_first_host_and_the_ledger_prevents_overcommit():
    ledger = Ledger()
    placed = []
    for i in range(9):
        decision = plan(request(f"demo/vm{i}", cpu=1, memory=1024), HOSTS, POOLS, ledger)
        if not decision.ok:
            break
        ledger.reserve(f"demo/vm{i}", decision.host, 1, 1024, "demo")
        placed.append(decision.host)
    assert placed == ["h1"] * 4 + ["h2"] * 4
    assert decision.reason == "InsufficientCapacity"
    assert "2 short of" in decision.message and "h1 has 0 of 1 vCPUs free" in decision.message


def test_release_returns_capacity():
    ledger = Ledger()
    ledger.reserve("demo/a", "h1", 4, 100, "demo")
    assert plan(request(), [HOSTS[0]], POOLS, ledger).reason == "InsufficientCapacity"
    ledger.release("demo/a")
    assert plan(request(), [HOSTS[0]], POOLS, ledger).host == "h1"


def test_filters_name_what_eliminated_each_host():
    hosts = [host("h1", unusable="Disconnected"), host("h2", hypervisor="Simulator"),
             host("h3", tags=frozenset({"hdd"})), host("h4", memory=256, tags=frozenset({"ssd"}))]
    decision = plan(request(host_tags=frozenset({"ssd"})), hosts, [local_pool(h.name) for h in hosts], Ledger())
    assert not decision.ok and decision.reason == "NoMatchingHost"
    for text in ("h1 is Disconnected", "h2 runs Simulator, not KVM", "h3 lacks host tags ['ssd']",
                 "h4 has 256 of 512 MiB free"):
        assert text in decision.message


def test_storage_must_be_reachable_and_roomy():
    shared = PoolCandidate("nfs", "Cluster", "c1", frozenset({"fast"}), True, frozenset({"h1", "h2"}), 10 * GIB,
                           9 * GIB, False)
    assert plan(request(storage_type="shared", disk_bytes=2 * GIB), HOSTS, [shared], Ledger()).reason == "InsufficientCapacity"
    assert plan(request(storage_type="shared", disk_bytes=GIB), HOSTS, [shared], Ledger()).pool == "nfs"
    decision = plan(request(storage_type="shared", storage_tags=frozenset({"slow"})), HOSTS, [shared], Ledger())
    assert decision.reason == "NoMatchingHost" and "with storage tags ['slow']" in decision.message
    assert plan(request(storage_type="local"), HOSTS, [shared], Ledger()).reason == "NoMatchingHost"


def test_pinned_host_is_honoured_or_refused():
    assert plan(request(host="h2"), HOSTS, POOLS, Ledger()).host == "h2"
    refused = plan(request(host="h9"), HOSTS, POOLS, Ledger())
    assert refused.reason == "PinnedHostNotFound" and "not the pinned host h9" in refused.message
    busy = Ledger()
    busy.reserve("x/y", "h2", 4, 0, "x")
    assert plan(request(host="h2"), HOSTS, POOLS, busy).reason == "NoMatchingHost"


def test_affinity_and_anti_affinity():
    anti = AffinityRule("spread", "HostAntiAffinity", frozenset({"h1"}))
    assert plan(request(affinity=(anti,)), HOSTS, POOLS, Ledger()).host == "h2"
    both = AffinityRule("spread", "HostAntiAffinity", frozenset({"h1", "h2"}))
    refused = plan(request(affinity=(both,)), HOSTS, POOLS, Ledger())
    assert refused.reason == "NoMatchingHost" and "anti-affinity group spread" in refused.message
    together = AffinityRule("pack", "HostAffinity", frozenset({"h2"}))
    assert plan(request(affinity=(together,)), HOSTS, POOLS, Ledger()).host == "h2"
    first_member = AffinityRule("pack", "HostAffinity", frozenset())
    assert plan(request(affinity=(first_member,)), HOSTS, POOLS, Ledger()).host == "h1"
    soft = AffinityRule("soft", "NonStrictHostAntiAffinity", frozenset({"h1", "h2"}))
    assert plan(request(affinity=(soft,)), HOSTS, POOLS, Ledger()).ok  # a preference, not a rule


def test_user_dispersing_spreads_one_owners_guests():
    ledger = Ledger()
    hosts = [host(f"h{i}") for i in range(3)]
    pools = [local_pool(h.name) for h in hosts]
    chosen = []
    for i in range(3):
        decision = plan(request(f"demo/vm{i}"), hosts, pools, ledger, AllocationAlgorithm.USER_DISPERSING)
        ledger.reserve(f"demo/vm{i}", decision.host, 1, 512, "demo")
        chosen.append(decision.host)
    assert sorted(chosen) == ["h0", "h1", "h2"]


def test_random_allocator_uses_every_fit():
    seen = {plan(request(), HOSTS, POOLS, Ledger(), AllocationAlgorithm.RANDOM, random.Random(i)).host
            for i in range(20)}
    assert seen == {"h1", "h2"}


def test_no_hosts_in_zone():
    assert plan(request(zone="z9"), HOSTS, POOLS, Ledger()).reason == "NoHostInZone"
