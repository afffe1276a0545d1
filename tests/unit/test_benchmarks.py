"""The benchmark scripts run (their figures are recorded in BENCHMARKS.md, not asserted here)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_planner_benchmark_runs():
    result = subprocess.run([sys.executable, "benchmarks/planner_throughput.py", "--hosts", "20", "--placements",
                             "50", "--repeat", "1", "--no-record"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "placements/s" in result.stdout


def test_watch_counts_sums_the_apiservers_open_watches_per_resource():
    sys.path.insert(0, str(REPO))  # the scripts' package, as they put it there themselves
    from benchmarks.simcloud import watch_counts

    metrics = "\n".join([
        "# HELP apiserver_longrunning_requests [BETA] Gauge of all active long-running apiserver requests",
        'apiserver_longrunning_requests{component="apiserver",group="cumulo.io",resource="virtualmachines",'
        'scope="cluster",subresource="",verb="WATCH",version="v1alpha1"} 2',
        'apiserver_longrunning_requests{component="apiserver",group="cumulo.io",resource="virtualmachines",'
        'scope="namespace",subresource="",verb="WATCH",version="v1alpha1"} 1',
        'apiserver_longrunning_requests{component="apiserver",group="",resource="pods",scope="namespace",'
        'subresource="log",verb="WATCH",version="v1"} 1',
        'apiserver_longrunning_requests{component="apiserver",group="cumulo.io",resource="volumes",'
        'scope="cluster",subresource="",verb="WATCH",version="v1alpha1"} 0',
        'apiserver_longrunning_requests{component="apiserver",group="",resource="pods",scope="namespace",'
        'subresource="exec",verb="CONNECT",version="v1"} 3',
        'apiserver_request_total{code="200",resource="virtualmachines",verb="WATCH"} 7',
    ])
    assert watch_counts(metrics) == {"pods/log": 1, "virtualmachines": 3}
