"""Builds the Go binaries Cumulo runs against (kube-apiserver, kubectl, etcd, helm) from the Go module proxy.

No release binaries can be downloaded where Cumulo is developed, so each tool has a small wrapper
module under ``toolchain/<name>/`` whose ``go.mod``/``go.sum`` pin the exact upstream version.
Builds are cached outside the repository, keyed by version, so only the first run pays for them.

The control plane (kube-apiserver, kubectl, etcd) is what `cumulo up` and the integration tests need;
helm is only for the chart's tests and users, so ``ensure_all`` builds the control plane unless asked
for everything (`cumulo toolchain`, the Makefile's `toolchain` target, builds every tool).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

TOOLCHAIN_DIR = Path(__file__).resolve().parent.parent / "toolchain"


@dataclasses.dataclass(frozen=True)
class GoTool:
    name: str
    main_module: str
    binaries: dict[str, str]  # binary name -> Go package path

    @property
    def module_dir(self) -> Path:
        return TOOLCHAIN_DIR / self.name

    @property
    def version(self) -> str:
        """The pinned version: the ``require`` line of the wrapper module."""
        text = (self.module_dir / "go.mod").read_text()
        match = re.search(rf"^\s*(?:require\s+)?{re.escape(self.main_module)}\s+(v\S+)", text, re.M)
        if not match:
            raise RuntimeError(f"{self.module_dir}/go.mod does not require {self.main_module}")
        return match.group(1)

    def requirement(self, module: str) -> str | None:
        """The version of ``module`` in the wrapper module's go.mod (a dependency of the main module)."""
        match = re.search(rf"^\s*(?:require\s+)?{re.escape(module)}\s+(v\S+)", (self.module_dir / "go.mod").read_text(),
                          re.M)
        return match.group(1) if match else None

    def ldflags(self) -> str:
        flags = "-s -w"
        if self.name == "kubernetes":
            major, minor = self.version.lstrip("v").split(".")[:2]
            for key, value in (("gitVersion", self.version), ("gitMajor", major), ("gitMinor", minor)):
                flags += f" -X k8s.io/component-base/version.{key}={value}"
        if self.name == "helm":
            # What helm's own Makefile stamps: its version, and the Kubernetes version `helm template` and
            # `helm lint` assume (.Capabilities.KubeVersion) from the client-go it was built with (v0.36 -> 1.36).
            flags += f" -X helm.sh/helm/v3/internal/version.version={self.version}"
            client_go = self.requirement("k8s.io/client-go")
            if client_go:
                minor = client_go.lstrip("v").split(".")[1]
                for package in ("pkg/lint/rules", "pkg/chartutil"):
                    flags += (f" -X helm.sh/helm/v3/{package}.k8sVersionMajor=1"
                              f" -X helm.sh/helm/v3/{package}.k8sVersionMinor={minor}")
        return flags


KUBERNETES = GoTool(
    "kubernetes",
    "k8s.io/kubernetes",
    {"kube-apiserver": "k8s.io/kubernetes/cmd/kube-apiserver", "kubectl": "k8s.io/kubernetes/cmd/kubectl"},
)
ETCD = GoTool(
    "etcd",
    "go.etcd.io/etcd/server/v3",
    {"etcd": "go.etcd.io/etcd/server/v3", "etcdctl": "go.etcd.io/etcd/etcdctl/v3"},
)
HELM = GoTool("helm", "helm.sh/helm/v3", {"helm": "helm.sh/helm/v3/cmd/helm"})
TOOLS = {tool.name: tool for tool in (KUBERNETES, ETCD, HELM)}
CONTROL_PLANE = (KUBERNETES, ETCD)


def cache_root() -> Path:
    return Path(os.environ.get("CUMULO_CACHE", Path.home() / ".cache" / "cumulo"))


def bin_dir(tool: GoTool) -> Path:
    return cache_root() / f"{tool.name}-{tool.version}" / "bin"


def binary(name: str) -> Path:
    """Path of a cached binary (it may not be built yet; see ``ensure``)."""
    for tool in TOOLS.values():
        if name in tool.binaries:
            return bin_dir(tool) / name
    raise KeyError(name)


def _go_env() -> dict[str, str]:
    # The wrapper modules' go.sum pins every hash; the proxy serves the checksum database too.
    return {**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=readonly -buildvcs=false"}


def _require_go() -> str:
    go = shutil.which("go")
    if go is None:
        raise RuntimeError("Go is not installed; Cumulo builds kube-apiserver and etcd with it (Go >= 1.26)")
    return go


def ensure(tool: GoTool | str, log=print) -> Path:
    """Build the tool's binaries unless the cache already has them; return their directory.

    ``tool`` is a GoTool or a tool's name (``ensure("helm")``)."""
    tool = TOOLS[tool] if isinstance(tool, str) else tool
    target = bin_dir(tool)
    missing = [name for name in tool.binaries if not (target / name).exists()]
    if not missing:
        return target
    go = _require_go()
    target.mkdir(parents=True, exist_ok=True)
    log(f"building {', '.join(missing)} {tool.version} from the Go module proxy into {target} "
        "(a cold build takes several minutes)")
    started = time.monotonic()
    staging = target.with_name(target.name + ".partial")
    staging.mkdir(exist_ok=True)
    subprocess.run(
        [go, "build", "-trimpath", "-ldflags", tool.ldflags(), "-o", str(staging) + "/",
         *(tool.binaries[name] for name in missing)],
        cwd=tool.module_dir, env=_go_env(), check=True,
    )
    for name in missing:
        # `go build -o dir/` names binaries after the package's last path element, skipping a
        # major-version suffix: go.etcd.io/etcd/server/v3 becomes "server".
        parts = tool.binaries[name].split("/")
        built = staging / (parts[-2] if re.fullmatch(r"v\d+", parts[-1]) else parts[-1])
        (staging / name if (staging / name).exists() else built).rename(target / name)
    shutil.rmtree(staging, ignore_errors=True)
    log(f"built {', '.join(missing)} in {time.monotonic() - started:.0f}s")
    return target


def ensure_all(log=print, tools=CONTROL_PLANE) -> None:
    """Build the control plane's tools (or the given ones: ``tools=TOOLS.values()`` for every tool)."""
    for tool in tools:
        ensure(tool, log)


def pin(tool: GoTool, version: str) -> None:
    """Rewrite the wrapper module for ``version`` (maintainers run this to move to a new release)."""
    go = _require_go()
    env = {**os.environ, "GOTOOLCHAIN": "local"}
    lines = [f"// Generated by 'cumulo toolchain pin {tool.name} {version}'; do not edit.",
             f"module cumulo.io/toolchain/{tool.name}", "", "go 1.26.0", ""]
    if tool is KUBERNETES:
        # k8s.io/kubernetes replaces its staging modules with local paths; map each to its
        # published v0.X.Y twin so the module builds outside the monorepo.
        info = json.loads(subprocess.run([go, "mod", "download", "-json", f"{tool.main_module}@{version}"],
                                         env=env, check=True, capture_output=True, text=True).stdout)
        staging = re.findall(r"^\s*(k8s\.io/\S+)\s+=>\s+\./staging/", Path(info["GoMod"]).read_text(), re.M)
        published = "v0." + version.lstrip("v").split(".", 1)[1]
        lines += [f"require {tool.main_module} {version}", "", "replace ("]
        lines += [f"\t{module} => {module} {published}" for module in staging]
        lines += [")"]
    (tool.module_dir / "go.mod").write_text("\n".join(lines) + "\n")
    (tool.module_dir / "go.sum").unlink(missing_ok=True)
    targets = [f"{package}@{version}" if tool is not KUBERNETES else package
               for package in tool.binaries.values()]
    subprocess.run([go, "get", "-tool", *targets], cwd=tool.module_dir, env=env, check=True)
    subprocess.run([go, "mod", "tidy"], cwd=tool.module_dir, env=env, check=True)


if __name__ == "__main__":  # usable before the virtualenv exists
    ensure_all(lambda message: print(message, file=sys.stderr), TOOLS.values())
