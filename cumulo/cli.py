"""`cumulo`: developer and operator commands (CRD generation, toolchain, the local cloud)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _crds(args: argparse.Namespace) -> int:
    from controllers.api import crd

    if args.check:
        difference = crd.diff(args.dir)
        if difference:
            sys.stdout.write(difference)
            print(f"\n{args.dir} is stale: run `cumulo crds` and commit the result", file=sys.stderr)
            return 1
        return 0
    for name in crd.write(args.dir):
        print(args.dir / name)
    return 0


def _toolchain(args: argparse.Namespace) -> int:
    from cumulo import toolchain

    if args.pin:
        tool, version = args.pin
        toolchain.pin(toolchain.TOOLS[tool], version)
        return 0
    toolchain.ensure_all()
    for tool in toolchain.TOOLS.values():
        print(f"{tool.name} {tool.version}: {toolchain.bin_dir(tool)}")
    return 0


def _up(args: argparse.Namespace) -> int:
    from cumulo import localcloud

    localcloud.up()
    return 0


def _down(args: argparse.Namespace) -> int:
    from cumulo import localcloud

    localcloud.down()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cumulo", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    crds = commands.add_parser("crds", help="generate crds/ from controllers/api")
    crds.add_argument("--dir", type=Path, default=REPO / "crds", help="output directory (default: crds/)")
    crds.add_argument("--check", action="store_true", help="only report whether the directory is stale")
    crds.set_defaults(func=_crds)

    tools = commands.add_parser("toolchain", help="build kube-apiserver, kubectl and etcd into the cache")
    tools.add_argument("--pin", nargs=2, metavar=("TOOL", "VERSION"), help="move a tool to a new upstream version")
    tools.set_defaults(func=_toolchain)

    commands.add_parser("up", help="start the local cloud (idempotent)").set_defaults(func=_up)
    commands.add_parser("down", help="stop the local cloud (idempotent)").set_defaults(func=_down)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
