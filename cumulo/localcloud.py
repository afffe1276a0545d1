"""`make up` / `make down`: a whole local Cumulo cloud on this machine, left running between commands.

Everything lives under ``.cumulo/`` in the repository: the control plane's work directory, the
admin kubeconfig (``.cumulo/kubeconfig``) and the logs. Both operations are idempotent.
"""

from __future__ import annotations

from pathlib import Path

from cumulo import envtest, toolchain

REPO = Path(__file__).resolve().parent.parent
STATE_DIR = REPO / ".cumulo"
CONTROL_PLANE_DIR = STATE_DIR / "control-plane"
KUBECONFIG = STATE_DIR / "kubeconfig"
CRDS = REPO / "crds"
QUICKSTART = REPO / "examples" / "quickstart"


def up(log=print) -> envtest.ControlPlane:
    toolchain.ensure_all(log)
    plane = envtest.ControlPlane.attach(CONTROL_PLANE_DIR)
    if plane is None:
        log(f"starting etcd and kube-apiserver ({toolchain.KUBERNETES.version}) in {CONTROL_PLANE_DIR}")
        plane = envtest.ControlPlane(CONTROL_PLANE_DIR).start(detach=True)
    else:
        log(f"control plane already running at {plane.server}")
    plane.install_crds(CRDS)
    plane.write_kubeconfig(KUBECONFIG)
    for manifest in sorted(QUICKSTART.glob("*.yaml")):
        plane.kubectl("apply", "--server-side", "--field-manager=cumulo-quickstart", "-f", str(manifest))
    log(f"""
Cumulo's control plane is up at {plane.server}; the quickstart zone is applied.

  export KUBECONFIG={KUBECONFIG.relative_to(REPO)}
  kubectl get cumulo -A                      # every Cumulo object
  kubectl explain virtualmachine.spec        # the API, documented
  kubectl get vm -n demo                     # the demo guest

Logs: {plane.workdir}/*.log. Stop everything with `make down`.""")
    return plane


def down(log=print) -> None:
    plane = envtest.ControlPlane.attach(CONTROL_PLANE_DIR)
    if plane is None:
        log("nothing is running")
    else:
        plane.stop()
        log("stopped the control plane")
    KUBECONFIG.unlink(missing_ok=True)
