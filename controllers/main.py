"""cumulo-controller: every cluster-wide reconciler of Cumulo in one kopf operator.

kopf provides the watch streams (resumable, with server-side selectors); ``@kopf.on.event`` handlers
feed them into the reconcile runtime (:mod:`controllers.runtime`). kopf's own per-handler state is
never used, so it writes nothing on the objects; its finalizer and annotation names are set under
``cumulo.io/`` all the same.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import typing as t

import kopf

from controllers import kinds, metrics
from controllers import log as controller_log
from controllers.api.v1alpha1.common import GROUP
from controllers.kubeapi import KubeApi, load_client
from controllers import reconcilers
from controllers.runtime import Kind, Runtime

log = logging.getLogger("cumulo.controller")


def register(registry: kopf.OperatorRegistry, options: argparse.Namespace) -> None:
    state: dict[str, Runtime] = {}

    @kopf.on.login(registry=registry)
    def login(**_: t.Any) -> kopf.ConnectionInfo:
        return connection_info(options.kubeconfig)

    @kopf.on.startup(registry=registry)
    async def start(settings: kopf.OperatorSettings, **_: t.Any) -> None:
        # kopf strips its own finalizer from objects none of its handlers need it on, so it must not be
        # the name Cumulo's reconcilers use.
        settings.persistence.finalizer = f"{GROUP}/kopf-finalizer"
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=GROUP, key="last-handled-configuration")
        settings.posting.level = logging.WARNING
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        for kind in kinds.ALL:
            if kind.selector:
                settings.watching.label_selectors[kind.group, kind.plural] = kind.selector
        runtime = Runtime(KubeApi(load_client(options.kubeconfig)), kinds.ALL, reconcilers.ALL,
                          workers=options.workers)
        runtime.reconcilers["hosts"].alert_after_seconds = options.host_alert_after
        metrics.watch_runtime(runtime)
        await runtime.start()
        state["runtime"] = runtime
        log.info("primed %d kinds; reconciling with %d workers", len(kinds.ALL), options.workers)

    @kopf.on.cleanup(registry=registry)
    async def stop(**_: t.Any) -> None:
        if "runtime" in state:
            await state["runtime"].stop()

    def handler(kind: Kind) -> t.Callable[..., t.Awaitable[None]]:
        async def on_event(event: t.Mapping[str, t.Any], **_: t.Any) -> None:
            runtime = state.get("runtime")
            if runtime is not None:
                runtime.observe(kind.plural, event.get("type"), event["object"])
        return on_event

    for kind in kinds.ALL:
        kopf.on.event(kind.group, kind.version, kind.plural, registry=registry)(handler(kind))


def connection_info(kubeconfig: str | None) -> kopf.ConnectionInfo:
    """kopf's credentials from the same kubeconfig (or in-cluster config) as the controller's client."""
    configuration = load_client(kubeconfig).configuration
    scheme, _, token = (configuration.api_key.get("authorization") or "").partition(" ")
    return kopf.ConnectionInfo(
        server=configuration.host, ca_path=configuration.ssl_ca_cert, insecure=not configuration.verify_ssl,
        certificate_path=configuration.cert_file, private_key_path=configuration.key_file,
        scheme=scheme or None, token=token or None,
    )


def parse_args(argv: t.Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cumulo-controller", description=__doc__.split("\n")[0])
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"),
                        help="kubeconfig to use (default: $KUBECONFIG, else in-cluster)")
    parser.add_argument("--workers", type=int, default=4, help="concurrent reconciles")
    parser.add_argument("--host-alert-after", type=float, default=300.0,
                        help="seconds a Disconnected host waits before it goes to Alert")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", choices=["text", "json"], default="text",
                        help="json: one object per line (time, level, logger, msg, fields), as cumulo-agent writes")
    parser.add_argument("--metrics-port", type=int, default=8080,
                        help="serve Prometheus metrics on this port at /metrics (0: no metrics server)")
    parser.add_argument("--metrics-address", default="0.0.0.0", help="address the metrics server listens on")
    return parser.parse_args(argv)


def main(argv: t.Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    controller_log.setup(options.log_level, options.log_format)
    # kopf logs every watch event it hands over; the runtime logs what it does with them.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    if options.metrics_port:
        try:
            metrics.serve(options.metrics_port, options.metrics_address)
            log.info("serving metrics on %s:%d/metrics", options.metrics_address, options.metrics_port)
        except OSError as error:  # reconciling matters more than metrics: say so and carry on
            log.error("cannot serve metrics on %s:%d: %s; running without", options.metrics_address,
                      options.metrics_port, error)
    registry = kopf.OperatorRegistry()
    register(registry, options)
    # Standalone: one active replica for now (leader election arrives with the Helm chart).
    asyncio.run(kopf.operator(registry=registry, standalone=True, clusterwide=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
