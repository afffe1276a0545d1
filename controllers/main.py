"""cumulo-controller: every cluster-wide reconciler of Cumulo in one process.

One list+watch per kind (:mod:`controllers.informer`, resumable, with server-side selectors) feeds the reconcile
runtime (:mod:`controllers.runtime`). kopf runs the process's lifecycle (start-up, clean-up, liveness) and the
admission webhook's server; it watches nothing and writes nothing on the objects (its finalizer and annotation
names are set under ``cumulo.io/`` all the same).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import typing as t

import kopf

from controllers import informer, kinds, leader, metrics, snapshotpolicy, webhook
from controllers import log as controller_log
from controllers.api.v1alpha1.common import GROUP, SYSTEM_NAMESPACE
from controllers.kubeapi import KubeApi, load_client
from controllers import reconcilers
from controllers.runtime import Runtime

log = logging.getLogger("cumulo.controller")


async def until_done(step: t.Callable[[], t.Awaitable[t.Any]], what: str, *, first: float = 1.0,
                     most: float = 30.0, sleep: t.Callable[[float], t.Awaitable[None]] = asyncio.sleep) -> t.Any:
    """Run ``step`` (the start-up LISTs) until it succeeds, backing off from ``first`` to ``most`` seconds.

    A controller restarted while kube-apiserver restarts too finds it away; left to kopf, a failed start-up
    handler is retried only after 60 s, a minute in which nothing is reconciled."""
    delay = first
    while True:
        try:
            return await step()
        except Exception as error:  # noqa: BLE001 (whatever the client raises while the API is away)
            log.warning("%s failed (%s: %s); retrying in %.0f s", what, type(error).__name__, error, delay)
            await sleep(delay)
            delay = min(delay * 2, most)


def register(registry: kopf.OperatorRegistry, options: argparse.Namespace,
             stop_flag: asyncio.Event | None = None) -> dict[str, t.Any]:
    """Register the handlers; the returned dict holds the runtime (and the elector), for main and tests."""
    state: dict[str, t.Any] = {}

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
        runtime = Runtime(KubeApi(load_client(options.kubeconfig, pool_size=options.workers + 8),
                                  threads=options.workers + 4), kinds.ALL, reconcilers.ALL, workers=options.workers,
                          coalesce_seconds=options.rollup_delay)
        runtime.reconcilers["hosts"].alert_after_seconds = options.host_alert_after
        runtime.reconcilers["volumes"].policy_clock = snapshotpolicy.ScaledClock(options.snapshot_policy_time_scale)
        runtime.reconcilers["hosts"].down_after_seconds = options.host_down_after
        metrics.watch_runtime(runtime)
        await until_done(lambda: webhook.setup(settings, options, runtime.api.client), "setting up the webhook")
        # The watches' own connections: one long request per kind, never queued behind the workers' writes.
        watch_client = load_client(options.kubeconfig, pool_size=len(kinds.ALL) + 2)
        runtime.watch(lambda kind, sink: informer.Informer(watch_client, kind, sink))
        if not options.leader_elect:
            await until_done(runtime.start, "loading the store")
            settle_heap()
            state["runtime"] = runtime
            log.info("primed %d kinds; reconciling with %d workers", len(kinds.ALL), options.workers)
            return
        # A standby loads the store now (the watches keep it current) and starts reconciling only once it
        # holds the Lease.
        await until_done(runtime.load, "loading the store")
        state["runtime"] = runtime
        state["leader_task"] = asyncio.create_task(lead(runtime), name="leader-election")

    async def lead(runtime: Runtime) -> None:
        elector = state["elector"] = leader.LeaderElector(
            leader.KubeLeaseApi(load_client(options.kubeconfig), options.leader_election_namespace,
                                options.leader_election_id),
            options.leader_identity or leader.default_identity(), lease_duration=options.lease_duration,
            renew_deadline=options.renew_deadline, retry_period=options.retry_period)
        campaign = asyncio.create_task(elector.run(), name="lease")
        try:
            await elector.leading.wait()
            await runtime.start()
            settle_heap()
            log.info("leading: primed %d kinds; reconciling with %d workers", len(kinds.ALL), options.workers)
            await elector.lost.wait()
            # Stop reconciling at once, then the whole process: it restarts as a clean standby.
            await runtime.stop()
            state["lost"] = True
            if stop_flag is not None:
                stop_flag.set()
        finally:
            campaign.cancel()  # releases the Lease when held (a clean stop)
            await asyncio.gather(campaign, return_exceptions=True)

    @kopf.on.cleanup(registry=registry)
    async def stop(**_: t.Any) -> None:
        # Reconciles stop before the Lease is released, so a standby never overlaps with them.
        if "runtime" in state:
            await state["runtime"].stop()
        if "leader_task" in state:
            state["leader_task"].cancel()
            await asyncio.gather(state["leader_task"], return_exceptions=True)

    webhook.install(registry, options, lambda: state.get("runtime"))
    return state


def settle_heap() -> None:
    """Move what the primed store holds out of the cyclic garbage collector's reach (``gc.freeze``): with 10,000
    guests that is ~600,000 long-lived objects, which every full collection would otherwise walk (~0.35 s each).
    Replaced versions are still freed by reference counting."""
    gc.collect()
    gc.freeze()


def connection_info(kubeconfig: str | None) -> kopf.ConnectionInfo:
    """kopf's credentials from the same kubeconfig (or in-cluster config) as the controller's client."""
    configuration = load_client(kubeconfig).configuration
    # The kubernetes client keeps a token as api_key["BearerToken"] (kubeconfig and in-cluster alike; older
    # releases used "authorization"); without it kopf would connect anonymously.
    credentials = configuration.api_key.get("BearerToken") or configuration.api_key.get("authorization") or ""
    scheme, _, token = credentials.partition(" ")
    return kopf.ConnectionInfo(
        server=configuration.host, ca_path=configuration.ssl_ca_cert, insecure=not configuration.verify_ssl,
        certificate_path=configuration.cert_file, private_key_path=configuration.key_file,
        scheme=scheme or None, token=token or None,
    )


def parse_args(argv: t.Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cumulo-controller", description=__doc__.split("\n")[0])
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"),
                        help="kubeconfig to use (default: $KUBECONFIG, else in-cluster)")
    parser.add_argument("--workers", type=int, default=16,
                        help="concurrent reconciles (they mostly wait for the apiserver; see benchmarks/burst.py)")
    parser.add_argument("--rollup-delay", type=float, default=1.0,
                        help="seconds a rollup (capacity of hosts, pools, clusters, pods and zones; offerings' user "
                        "counts) waits for more changes before it is written: one write for a burst of guests")
    parser.add_argument("--host-alert-after", type=float, default=300.0,
                        help="seconds a Disconnected host waits before it goes to Alert")
    parser.add_argument("--host-down-after", type=float, default=90.0,
                        help="seconds a host's Lease and storage heartbeat must both be silent before it is Down "
                        "(fenced) and its HA guests restart elsewhere; keep it above the agents' --fence-after plus "
                        "their heartbeat and check intervals")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--snapshot-policy-time-scale", type=float, default=1.0,
                        help="tests only: snapshot policy schedules run this many times faster than real time")
    webhook.add_arguments(parser)
    election = parser.add_argument_group("leader election (one active replica; see controllers/leader.py)")
    election.add_argument("--leader-elect", action="store_true",
                          help="reconcile only while holding the Lease (every replica of a Deployment sets this)")
    election.add_argument("--leader-election-namespace", default=os.environ.get("POD_NAMESPACE", SYSTEM_NAMESPACE),
                          help="namespace of the Lease (default: $POD_NAMESPACE, else cumulo-system)")
    election.add_argument("--leader-election-id", default=leader.LEASE_NAME, help="name of the Lease")
    election.add_argument("--leader-identity", help="holder identity (default: $POD_NAME or host-pid, plus a "
                          "random suffix)")
    election.add_argument("--lease-duration", type=float, default=15.0,
                          help="seconds a standby waits after the last renewal it saw before taking over")
    election.add_argument("--renew-deadline", type=float, default=10.0,
                          help="seconds the leader keeps trying to renew before it stops reconciling")
    election.add_argument("--retry-period", type=float, default=2.0, help="seconds between election attempts")
    parser.add_argument("--health-port", type=int, default=0,
                        help="serve kopf's liveness probe at http://0.0.0.0:PORT/healthz (0: off)")
    parser.add_argument("--log-format", choices=["text", "json"], default="text",
                        help="json: one object per line (time, level, logger, msg, fields), as cumulo-agent writes")
    parser.add_argument("--metrics-port", type=int, default=8080,
                        help="serve Prometheus metrics on this port at /metrics (0: no metrics server)")
    parser.add_argument("--metrics-address", default="0.0.0.0", help="address the metrics server listens on")
    return parser.parse_args(argv)


def main(argv: t.Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    controller_log.setup(options.log_level, options.log_format)
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    if options.metrics_port:
        try:
            metrics.serve(options.metrics_port, options.metrics_address)
            log.info("serving metrics on %s:%d/metrics", options.metrics_address, options.metrics_port)
        except OSError as error:  # reconciling matters more than metrics: say so and carry on
            log.error("cannot serve metrics on %s:%d: %s; running without", options.metrics_address,
                      options.metrics_port, error)
    registry = kopf.OperatorRegistry()
    stop_flag = asyncio.Event()
    state = register(registry, options, stop_flag)
    # Standalone: kopf's peering is off; one active replica is the Lease's job (--leader-elect).
    liveness = f"http://0.0.0.0:{options.health_port}/healthz" if options.health_port else None
    asyncio.run(kopf.operator(registry=registry, standalone=True, clusterwide=True, stop_flag=stop_flag,
                              liveness_endpoint=liveness))
    if state.get("lost"):
        log.error("exiting: the leader Lease was lost")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
