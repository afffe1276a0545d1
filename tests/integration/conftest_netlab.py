"""Fixtures for tests on a simulated network (a pytest plugin: ``pytest_plugins = ["conftest_netlab"]``).

* ``netlab``: a :class:`cumulo.netlab.NetLab` with a unique prefix, torn down after the test (labs of crashed
  runs are reaped first). Add hosts with ``netlab.add_host("h1")`` and the internet with ``netlab.add_public()``.
* ``netlab_factory``: for tests wanting more than one lab (each closed at the end).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from cumulo import netlab as netlab_module
from cumulo.netlab import NetLab


@pytest.fixture(scope="session")
def _netlab_reaped() -> None:
    reason = netlab_module.unavailable_reason()
    if reason is not None:
        pytest.skip(reason=f"no network lab: {reason}")
    netlab_module.reap_stale()


@pytest.fixture
def netlab_factory(_netlab_reaped: None) -> Iterator[Callable[..., NetLab]]:
    labs: list[NetLab] = []

    def make(prefix: str | None = None, **kwargs: object) -> NetLab:
        lab = NetLab(prefix, **kwargs)  # type: ignore[arg-type]
        labs.append(lab)
        return lab

    yield make
    for lab in labs:
        lab.close()


@pytest.fixture
def netlab(netlab_factory: Callable[..., NetLab]) -> NetLab:
    return netlab_factory()
