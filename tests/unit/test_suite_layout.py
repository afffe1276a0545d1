"""The test tiers run in one pytest session (`make test`): module basenames must be unique across them (pytest
imports test modules by basename), and no test may import `conftest` by name (each tier has its own). Integration
and end-to-end test modules share code through helper modules (libvirtcloud, simzone, networkcloud...), never by
importing one another."""

from __future__ import annotations

import collections
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_test_module_basenames_are_unique_across_tiers():
    modules = collections.defaultdict(list)
    for path in TESTS.rglob("*.py"):
        if path.name not in ("conftest.py", "__init__.py"):
            modules[path.name].append(str(path.relative_to(TESTS)))
    assert {name: paths for name, paths in modules.items() if len(paths) > 1} == {}


def test_no_test_imports_conftest_by_name():
    offenders = [str(path.relative_to(TESTS)) for path in TESTS.rglob("*.py")
                 if re.search(r"^\s*(from conftest import|import conftest)", path.read_text(), re.MULTILINE)]
    assert offenders == []


def test_integration_and_e2e_test_modules_import_only_helper_modules():
    paths = [path for tier in ("integration", "e2e") for path in (TESTS / tier).rglob("*.py")]
    offenders = [str(path.relative_to(TESTS)) for path in paths
                 if re.search(r"^\s*(from test_\w* import|import test_)", path.read_text(), re.MULTILINE)]
    assert offenders == []
