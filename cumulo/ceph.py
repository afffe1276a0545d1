"""A private single-node Ceph cluster: one monitor, one manager and one memstore OSD, for the RBD tests and
anyone who wants a real Ceph without a real cluster.

Each instance has its own fsid, its own monitor port on 127.0.0.1 (messenger v1 only: a ``host:port``
monitor address, as a StoragePool and a libvirt ``<host>`` give it, means v1 for any port but 3300) and its
own configuration, keyrings, run, log and data directories under one work directory. Nothing is shared with
another instance or with a system Ceph (``/etc/ceph`` is never read: every command gets ``-c``).

Facts of these machines the setup relies on:

* Debian's ceph-mon, ceph-mgr, ceph-osd and ceph-common (Ceph 16). With ``osd objectstore = memstore`` the
  OSD keeps its objects in memory (``memstore device bytes`` is the capacity Ceph reports), so a cluster
  starts in a few seconds and its data goes with it.
* One OSD: pools of size 1 (``mon allow pool size one``, ``osd pool default size = 1``) and a CRUSH rule
  choosing OSDs, not hosts (``osd crush chooseleaf type = 0``).
* The admin keyring is given under ``[client]``: under ``[global]`` it would replace the daemons' own
  keyrings (``$<type>_data/keyring``) and the manager and OSD would fail to authenticate.
* The OSD's key is registered with the monitor before ``ceph-osd --mkfs``.
* HEALTH_OK can come before the placement groups are active+clean: :meth:`PrivateCeph.start` waits for both.
* ``paxos propose interval``, ``mgr stats period`` and ``mon mgr digest period`` shortened: pool and snapshot
  operations and pool statistics are ~10x faster. Without a manager, pool statistics never change.

The daemons die with the Python process (PR_SET_PDEATHSIG) and :meth:`PrivateCeph.stop` ends them and removes
the work directory.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from cumulo import processes

PACKAGES = {"ceph-mon": "ceph-mon", "ceph-mgr": "ceph-mgr", "ceph-osd": "ceph-osd", "ceph": "ceph-common",
            "ceph-authtool": "ceph-common", "monmaptool": "ceph-common"}
MEMSTORE_BYTES = 4 * 1024**3


class CephUnavailable(RuntimeError):
    """This machine cannot run a private Ceph; the message says why (tests skip with it)."""


def unavailable_reason() -> str | None:
    """Why a private Ceph cannot run here, or None if it can."""
    for binary, package in PACKAGES.items():
        if shutil.which(binary) is None:
            return f"{binary} is not installed (Debian package {package}; run hack/install-system-deps)"
    for module, package in (("rados", "python3-rados"), ("rbd", "python3-rbd")):
        try:
            __import__(module)
        except ImportError as error:
            return (f"the {module} Python binding is not importable ({error}); install {package} and run "
                    "hack/link-system-python")
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PrivateCeph:
    """One private Ceph cluster. Use as a context manager, or start()/stop()."""

    def __init__(self, workdir: Path | str | None = None, *, memstore_bytes: int = MEMSTORE_BYTES) -> None:
        self._owns_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="cumulo-ceph-")).absolute()
        self.fsid = str(uuid.uuid4())
        self.port = 0
        self.memstore_bytes = memstore_bytes
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.startup_seconds: float | None = None
        self.admin_key = ""

    # -- addresses and credentials ----------------------------------------------------------------

    @property
    def conf(self) -> Path:
        return self.workdir / "ceph.conf"

    @property
    def monitor(self) -> str:
        """The monitor's address, ``127.0.0.1:<port>`` (v1)."""
        return f"127.0.0.1:{self.port}"

    @property
    def admin_keyring(self) -> Path:
        return self.workdir / "client.admin.keyring"

    def __enter__(self) -> PrivateCeph:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- commands ---------------------------------------------------------------------------------

    def run(self, *args: str, timeout: float = 30.0, input: bytes | None = None) -> str:
        """``args`` (a Ceph tool and its arguments) against this cluster; raises CephUnavailable on failure."""
        argv = [args[0], "-c", str(self.conf), *args[1:]] if args[0] in ("ceph", "rbd", "rados") else list(args)
        try:
            done = subprocess.run(argv, capture_output=True, timeout=timeout, input=input, check=False)
        except subprocess.TimeoutExpired:
            raise CephUnavailable(f"{' '.join(argv)} did not finish within {timeout:g}s") from None
        if done.returncode != 0:
            raise CephUnavailable(f"{' '.join(argv)} failed ({done.returncode}): "
                                  f"{done.stderr.decode(errors='replace').strip()[-2000:]}")
        return done.stdout.decode()

    def ceph_json(self, *args: str, timeout: float = 30.0) -> Any:
        return json.loads(self.run("ceph", *args, "--format", "json", timeout=timeout) or "null")

    def create_pool(self, name: str, pg_num: int = 8) -> None:
        """A replicated pool of size 1 for RBD images."""
        self.run("ceph", "osd", "pool", "create", name, str(pg_num), str(pg_num))
        self.run("ceph", "osd", "pool", "application", "enable", name, "rbd")

    def delete_pool(self, name: str) -> None:
        self.run("ceph", "osd", "pool", "delete", name, name, "--yes-i-really-really-mean-it")

    def create_user(self, name: str, pool: str) -> str:
        """A client ``client.<name>`` allowed RBD on ``pool``; returns its key."""
        out = self.ceph_json("auth", "get-or-create", f"client.{name}", "mon", "profile rbd", "osd",
                             f"profile rbd pool={pool}", "mgr", f"profile rbd pool={pool}")
        return str(out[0]["key"])

    # -- lifecycle --------------------------------------------------------------------------------

    def _write_config(self) -> None:
        w = self.workdir
        for name in ("run", "log", "mon", "mgr", "osd"):
            (w / name).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(f"""[global]
fsid = {self.fsid}
mon host = {self.monitor}
mon initial members = a
ms bind msgr2 = false
ms bind ipv4 = true
ms bind ipv6 = false
public addr = 127.0.0.1
cluster addr = 127.0.0.1
mon data avail warn = 1
mon data avail crit = 0
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
run dir = {w}/run
admin socket = {w}/run/$name.asok
pid file = {w}/run/$name.pid
log file = {w}/log/$name.log
mon data = {w}/mon/$id
mgr data = {w}/mgr/$id
osd data = {w}/osd/$id
osd objectstore = memstore
memstore device bytes = {self.memstore_bytes}
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
paxos propose interval = 0.1
mgr stats period = 1
mon mgr digest period = 1
osd max object name len = 256
osd max object namespace len = 64
crash dir = {w}/crash

[client]
keyring = {self.admin_keyring}
""")

    def _spawn(self, name: str, *argv: str) -> None:
        self.procs[name] = processes.spawn([argv[0], "-f", "-c", str(self.conf), *argv[1:]],
                                           self.workdir / "log" / f"{name}.out", detach=False)

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise CephUnavailable(f"{name} exited with {proc.returncode}:\n"
                                      f"{processes.tail(self.workdir / 'log' / f'{name}.out', 0, 20)}")

    def start(self, timeout: float = 90.0) -> PrivateCeph:
        """Create the cluster and wait until it is HEALTH_OK with every placement group active+clean."""
        reason = unavailable_reason()
        if reason is not None:
            raise CephUnavailable(reason)
        started = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self._write_config()
        w = self.workdir
        try:
            mon_keyring = w / "mon.keyring"
            self.run("ceph-authtool", "--create-keyring", str(mon_keyring), "--gen-key", "-n", "mon.",
                     "--cap", "mon", "allow *")
            self.run("ceph-authtool", "--create-keyring", str(self.admin_keyring), "--gen-key", "-n", "client.admin",
                     "--cap", "mon", "allow *", "--cap", "osd", "allow *", "--cap", "mgr", "allow *",
                     "--cap", "mds", "allow *")
            self.run("ceph-authtool", str(mon_keyring), "--import-keyring", str(self.admin_keyring))
            monmap = w / "monmap"
            self.run("monmaptool", "--create", "--addv", "a", f"[v1:{self.monitor}]", "--fsid", self.fsid, str(monmap))
            self.run("ceph-mon", "-c", str(self.conf), "--mkfs", "-i", "a", "--monmap", str(monmap),
                     "--keyring", str(mon_keyring))
            self._spawn("mon.a", "ceph-mon", "-i", "a")
            self._wait(lambda: self.ceph_json("mon", "stat", timeout=5), timeout, "the monitor")
            (w / "mgr" / "x").mkdir(parents=True, exist_ok=True)
            self.run("ceph", "auth", "get-or-create", "mgr.x", "mon", "allow profile mgr", "osd", "allow *",
                     "mds", "allow *", "-o", str(w / "mgr" / "x" / "keyring"))
            self._spawn("mgr.x", "ceph-mgr", "-i", "x")
            osd_uuid = str(uuid.uuid4())
            osd_dir = w / "osd" / "0"
            osd_dir.mkdir(parents=True, exist_ok=True)
            # The key first (the OSD authenticates during --mkfs), then the id.
            self.run("ceph", "auth", "get-or-create", "osd.0", "mon", "allow profile osd", "mgr", "allow profile osd",
                     "osd", "allow *", "-o", str(osd_dir / "keyring"))
            osd_id = self.run("ceph", "osd", "new", osd_uuid, "0").strip()
            if osd_id != "0":
                raise CephUnavailable(f"expected OSD id 0, got {osd_id!r}")
            self.run("ceph-osd", "-c", str(self.conf), "-i", "0", "--mkfs", "--osd-uuid", osd_uuid, timeout=60)
            self._spawn("osd.0", "ceph-osd", "-i", "0")
            self.admin_key = self.run("ceph-authtool", str(self.admin_keyring), "-n", "client.admin",
                                      "--print-key").strip()
            self._wait(self._healthy, timeout - (time.monotonic() - started), "HEALTH_OK with an up OSD and a mgr")
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def _healthy(self) -> bool:
        status = self.ceph_json("status", timeout=5)
        osdmap = status.get("osdmap") or {}
        osdmap = osdmap.get("osdmap", osdmap)
        return status["health"]["status"] == "HEALTH_OK" and osdmap.get("num_up_osds") == 1 and \
            bool((status.get("mgrmap") or {}).get("available"))

    def pgs_clean(self) -> bool:
        """Every placement group active+clean (HEALTH_OK alone does not say so while a new pool peers)."""
        pgmap = self.ceph_json("status", timeout=5).get("pgmap") or {}
        total = pgmap.get("num_pgs", 0)
        clean = sum(state["count"] for state in pgmap.get("pgs_by_state") or []
                    if state["state_name"] == "active+clean")
        return clean == total

    def wait_clean(self, timeout: float = 60.0) -> None:
        self._wait(lambda: self._healthy() and self.pgs_clean(), timeout, "active+clean placement groups")

    def _wait(self, check: Any, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            self._check_alive()
            try:
                last = check()
                if last:
                    return last
            except CephUnavailable as error:
                last = error
            if time.monotonic() > deadline:
                raise CephUnavailable(f"timed out after {timeout:.0f}s waiting for {what}; last: {last}")
            time.sleep(0.2)

    def stop(self, timeout: float = 10.0) -> None:
        """End the daemons (OSD, manager, then monitor) and remove the work directory. Idempotent."""
        for name in ("osd.0", "mgr.x", "mon.a"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self._owns_workdir:
            with contextlib.suppress(OSError):
                shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(f"{path.name}:\n{processes.tail(path, 0, lines)}"
                         for path in sorted((self.workdir / "log").glob("*")))
