"""The benchmark scripts run (tiny sizes, nothing recorded): they are measurements, so only that they complete and
print their figures is checked here, never the figures themselves."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(600)


def run(script: str, *args: str, timeout: float = 500) -> str:
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args, "--no-write"], cwd=REPO,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_burst_runs() -> None:
    out = run("burst.py", "--guests", "5", "--hosts", "2")
    assert "5 guests at once" in out and "5 guests 100 ms apart" in out and "p99" in out


def test_burst_profiles_the_apiserver(tmp_path: Path) -> None:
    out = run("burst.py", "--guests", "5", "--hosts", "2", "--only", "burst", "--apiserver-profile", str(tmp_path),
              "--apiserver-profile-seconds", "3", "--identities", "certificates", "--no-audit")
    assert (tmp_path / "kube-apiserver-burst.pprof").stat().st_size > 0
    assert "kube-apiserver CPU per guest start" in out and "pprof over 3 s" in out and "runtime." in out, out
    assert "status patches (StatusREST.Update): " in out and "GC background marking: " in out, out
    assert "open WATCH requests per resource" in out and "virtualmachines" in out, out
    assert "no audit log" in out and "client certificates" in out and "per guest start: controller" in out


def test_api_writes_runs() -> None:
    out = run("api_writes.py", "--guests", "5", "--hosts", "2", "--idle", "2", "--settle", "2")
    assert "writes per VM start" in out and "who writes what" in out
    # ServiceAccount tokens (the default identities) are told apart like the certificates were.
    assert "agent patch virtualmachines/status" in out and "controller patch virtualmachines/status" in out, out


def test_scale_runs() -> None:
    out = run("scale.py", "--hosts", "4", "--vms", "8", "--hosts-per-agent", "2", "--idle", "12")
    assert "8 guests on 4 simulated hosts (2 agent processes" in out and "kubectl get vm -A" in out
    assert "background of the idle hosts" in out and "PATCH leases" in out  # a heartbeat every 10 s per host


def test_ha_runs() -> None:
    out = run("ha.py", "--hosts", "2", "--guests", "2", "--lease-duration", "3", "--down-after", "6",
              "--fence-after", "4", "--wait", "40")
    assert "Down after" in out and "HA guests Running elsewhere: 2 of 2" in out


def test_real_guest_runs() -> None:
    from cumulo.libvirtd import unavailable_reason

    if reason := unavailable_reason():
        pytest.skip(reason=f"no private libvirtd here: {reason}")
    out = run("real_guest.py", "--runs", "1")
    assert "Cumulo's overhead" in out
