"""`cumulo`: developer and operator commands (CRD generation, toolchain, the local cloud, guest consoles)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


CHART_CRDS = REPO / "charts" / "cumulo" / "crds"


def _crds(args: argparse.Namespace) -> int:
    from controllers.api import crd

    # The Helm chart ships the same files in its crds/ (helm installs them before the templates).
    directories = [args.dir] + ([CHART_CRDS] if args.dir.resolve() == (REPO / "crds").resolve() else [])
    if args.check:
        stale = 0
        for directory in directories:
            difference = crd.diff(directory)
            if difference:
                sys.stdout.write(difference)
                print(f"\n{directory} is stale: run `cumulo crds` and commit the result", file=sys.stderr)
                stale = 1
        return stale
    for directory in directories:
        for name in crd.write(directory):
            print(directory / name)
    return 0


def _toolchain(args: argparse.Namespace) -> int:
    from cumulo import toolchain

    if args.pin:
        tool, version = args.pin
        toolchain.pin(toolchain.TOOLS[tool], version)
        return 0
    toolchain.ensure_all(tools=toolchain.TOOLS.values())
    for tool in toolchain.TOOLS.values():
        print(f"{tool.name} {tool.version}: {toolchain.bin_dir(tool)}")
    return 0


def _up(args: argparse.Namespace) -> int:
    from cumulo import envtest, localcloud

    try:
        localcloud.up(args.state_dir, timeout=args.timeout)
    except (localcloud.LocalCloudError, envtest.ControlPlaneError, envtest.KubectlError) as error:
        print(f"cumulo up: {error}", file=sys.stderr)
        return 1
    return 0


def _down(args: argparse.Namespace) -> int:
    from cumulo import localcloud

    localcloud.down(args.state_dir)
    return 0


def _netns(args: argparse.Namespace) -> int:
    """Run a command inside a network namespace of the local cloud's lab: a host's, or the public side's."""
    import os

    from cumulo import localcloud, processes

    layout = localcloud.Layout(args.state_dir.absolute() if args.state_dir else localcloud.STATE_DIR)
    lab = localcloud.Lab.from_json((processes.read_json(layout.state) or {}).get("lab"))
    if lab is None:
        print(f"cumulo netns: no local cloud runs from {layout.root} (`cumulo up` first)", file=sys.stderr)
        return 1
    names = {"public": lab.public, **lab.hosts}
    if args.where not in names:
        print(f"cumulo netns: {args.where!r}: expected one of {', '.join(names)}", file=sys.stderr)
        return 2
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    os.execvp("ip", ["ip", "netns", "exec", names[args.where], *(argv or [os.environ.get("SHELL", "/bin/sh")])])


def _console_kubeconfig(flag: str | None) -> str | None:
    """--kubeconfig, else $KUBECONFIG, else the local cloud's admin kubeconfig (.cumulo/kubeconfig), else the
    client's default (~/.kube/config)."""
    import os

    if flag:
        return flag
    if os.environ.get("KUBECONFIG"):
        return None  # the client reads it (a list of files, too)
    local = REPO / ".cumulo" / "kubeconfig"
    return str(local) if local.exists() else None


def _console(args: argparse.Namespace) -> int:
    """Print (or follow) a guest's serial console log, found through its status.node.consoleLog."""
    import os
    import time

    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException
    from kubernetes.config.config_exception import ConfigException

    namespace, sep, name = args.vm.rpartition("/")
    if not sep:
        namespace = args.namespace or "default"
    if not name or not namespace:
        print(f"cumulo console: {args.vm!r}: expected <namespace>/<name> or <name>", file=sys.stderr)
        return 2
    try:
        api = client.CustomObjectsApi(config.new_client_from_config(config_file=_console_kubeconfig(args.kubeconfig)))
    except (ConfigException, OSError) as error:
        print(f"cumulo console: cannot load a kubeconfig: {error}", file=sys.stderr)
        return 2

    def console_path() -> tuple[str | None, str]:
        vm = api.get_namespaced_custom_object("cumulo.io", "v1alpha1", namespace, "virtualmachines", name)
        node = (vm.get("status") or {}).get("node") or {}
        return node.get("consoleLog"), node.get("host") or "?"

    try:
        path, host = console_path()
    except ApiException as error:
        reason = "not found" if error.status == 404 else f"{error.status} {error.reason}"
        print(f"cumulo console: VirtualMachine {namespace}/{name}: {reason}", file=sys.stderr)
        return 1
    if not path:
        print(f"cumulo console: VirtualMachine {namespace}/{name} has no console log yet (it has not been started "
              "on a libvirt host)", file=sys.stderr)
        return 1
    out = sys.stdout.buffer
    position = 0
    inode = None
    try:
        while True:
            try:
                with open(path, "rb") as file:
                    stat = os.fstat(file.fileno())
                    if inode is not None and (stat.st_ino != inode or stat.st_size < position):
                        position = 0  # rotated or truncated: start over
                    inode = stat.st_ino
                    file.seek(position)
                    data = file.read()
                    position += len(data)
            except FileNotFoundError:
                if not args.follow:
                    print(f"cumulo console: {path} does not exist here; the console log is on host {host}",
                          file=sys.stderr)
                    return 1
                data = b""
            except PermissionError as error:
                print(f"cumulo console: cannot read {path}: {error.strerror}", file=sys.stderr)
                return 1
            if data:
                out.write(data)
                out.flush()
            if not args.follow:
                return 0
            time.sleep(0.2)
    except KeyboardInterrupt:
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cumulo", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    crds = commands.add_parser("crds", help="generate crds/ (and the chart's crds/) from controllers/api")
    crds.add_argument("--dir", type=Path, default=REPO / "crds", help="output directory (default: crds/)")
    crds.add_argument("--check", action="store_true", help="only report whether the directory is stale")
    crds.set_defaults(func=_crds)

    tools = commands.add_parser("toolchain", help="build kube-apiserver, kubectl, etcd and helm into the cache")
    tools.add_argument("--pin", nargs=2, metavar=("TOOL", "VERSION"), help="move a tool to a new upstream version")
    tools.set_defaults(func=_toolchain)

    state_dir = {"type": Path, "default": None, "metavar": "DIR",
                 "help": "where the local cloud keeps its state, logs and kubeconfig (default: .cumulo/)"}
    up = commands.add_parser("up", help="start the local cloud and wait until its hosts are Up (idempotent)")
    up.add_argument("--state-dir", **state_dir)
    up.add_argument("--timeout", type=float, default=120.0, help="seconds the hosts get to come Up (default: 120)")
    up.set_defaults(func=_up)
    down = commands.add_parser("down", help="stop everything `cumulo up` started (idempotent)")
    down.add_argument("--state-dir", **state_dir)
    down.set_defaults(func=_down)

    netns = commands.add_parser("netns", help="run a command in the local cloud's public namespace or a host's",
                                description="Run COMMAND (default: a shell) inside a network namespace of the "
                                            "local cloud: `public` (the internet side, holding the public "
                                            "gateway) or a host, e.g. `cumulo netns public -- curl "
                                            "http://203.0.113.10/`.")
    netns.add_argument("--state-dir", **state_dir)
    netns.add_argument("where", metavar="public|HOST", help="the public side, or a host of the quickstart")
    netns.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND", help="what to run there")
    netns.set_defaults(func=_netns)

    console = commands.add_parser("console", help="print or follow a VirtualMachine's serial console log")
    console.add_argument("vm", metavar="NAMESPACE/NAME", help="the VirtualMachine (a bare name: --namespace)")
    console.add_argument("-f", "--follow", action="store_true", help="keep printing what the guest writes")
    console.add_argument("-n", "--namespace", help="namespace of a bare VM name (default: default)")
    console.add_argument("--kubeconfig", help="admin kubeconfig (default: $KUBECONFIG, .cumulo/kubeconfig, "
                                              "~/.kube/config)")
    console.set_defaults(func=_console)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
