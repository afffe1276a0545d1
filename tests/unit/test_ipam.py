"""IPAM and identifier pools: no value twice, static requests honoured or refused, rebuild from records."""

from __future__ import annotations

import random

import pytest

from controllers.ipam import AllocationError, Pool, Subnet, first_host, mac_address, public_pool


def test_a_slash_24_hands_out_253_distinct_addresses_then_says_it_is_exhausted():
    pool = Subnet("10.1.1.0/24", gateway="10.1.1.1").pool()
    owners = [f"vm-{i}" for i in range(253)]
    random.Random(7).shuffle(owners)
    addresses = [pool.allocate_address(owner) for owner in owners]
    assert len(set(addresses)) == 253
    assert "10.1.1.1" not in addresses and "10.1.1.0" not in addresses and "10.1.1.255" not in addresses
    with pytest.raises(AllocationError) as error:
        pool.allocate_address("one-too-many")
    assert error.value.reason == "Exhausted" and "253" in error.value.message


def test_allocation_is_idempotent_per_owner_and_released_addresses_come_back():
    pool = Subnet("10.1.1.0/29", gateway="10.1.1.1").pool()
    first = pool.allocate_address("a")
    assert pool.allocate_address("a") == first
    pool.release("a")
    assert pool.allocate_address("b") == first


def test_a_static_address_is_honoured_or_refused_with_a_reason():
    pool = Subnet("10.1.1.0/24", gateway="10.1.1.1", start_ip="10.1.1.10", end_ip="10.1.1.20").pool()
    assert pool.allocate_address("a", "10.1.1.15") == "10.1.1.15"
    cases = {"10.1.1.15": "InUse", "10.1.1.1": "OutOfRange", "10.1.2.5": "OutOfRange", "10.1.1.30": "OutOfRange"}
    for wanted, reason in cases.items():
        with pytest.raises(AllocationError) as error:
            pool.allocate_address("b", wanted)
        assert error.value.reason == reason, wanted
    assert pool.allocate_address("b") == "10.1.1.10"


def test_the_gateway_inside_the_range_is_reserved():
    pool = Subnet("10.1.1.0/29", gateway="10.1.1.3").pool()
    with pytest.raises(AllocationError) as error:
        pool.allocate_address("a", "10.1.1.3")
    assert error.value.reason == "Reserved"
    assert sorted(pool.allocate_address(f"o{i}") for i in range(5)) == \
        ["10.1.1.1", "10.1.1.2", "10.1.1.4", "10.1.1.5", "10.1.1.6"]


def test_rebuild_refuses_a_second_holder_and_keeps_the_first():
    pool = Pool([(100, 110)])
    assert pool.record("net-a", 105) is None
    assert pool.record("net-b", 105) == "net-a"
    assert pool.get("net-b") is None and pool.allocate("net-b") == 100


def test_public_pool_reserves_each_range_gateway():
    pool = public_pool([("203.0.113.1", "203.0.113.3", "203.0.113.1")])
    assert pool.size == 2
    assert [pool.allocate(o) for o in ("x", "y")] == [0xCB007102, 0xCB007103]


def test_macs_are_stable_unicast_and_locally_administered():
    mac = mac_address("uid/net")
    assert mac == mac_address("uid/net") != mac_address("uid/net", 1)
    first = int(mac.split(":")[0], 16)
    assert first & 1 == 0 and first & 2 == 2
    assert first_host("10.1.1.0/24") == "10.1.1.1"
