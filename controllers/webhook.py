"""The validating admission webhook, served by cumulo-controller itself (kopf's admission support).

Why in the controller: the rules (:mod:`controllers.admission`) read the controller's primed store
rather than calling the API per request, and the quota check reserves in the same ledger the
controller enforces (:mod:`controllers.reconcilers.quota`); one process and one event loop make the
check-and-reserve atomic, so concurrent creates cannot together exceed a Quota.

- kopf's ``WebhookServer`` serves HTTPS on ``--webhook-port``, one ``kopf.on.validate`` handler (id
  ``cumulo``, so the path is ``/cumulo``) for the tenant kinds in ``admission.RULES``, CREATE and
  UPDATE only (status writes go to the status subresource and never reach it).
- Certificates: ``--webhook-cert-dir`` holding ``tls.crt``/``tls.key`` (and ``ca.crt``), as a
  mounted Secret from the Helm chart or cert-manager provides them; when the directory has none, a
  CA and a serving certificate for ``--webhook-host`` are generated there (dev and tests).
  kopf re-reads the files when they change.
- Registration: with ``--webhook-url-base`` (dev/test: the apiserver reaches the process by URL)
  the controller writes the ``ValidatingWebhookConfiguration`` itself at start; in production the
  chart ships it (``charts/cumulo/templates/webhook.yaml``, the same shape as :func:`configuration`).

failurePolicy is ``Ignore``: while no controller serves (a restart, a leader change) tenants can
still create, and the controller's second line (conditions; the quota ledger holding back guests
that do not fit) keeps the rules. ``Fail`` would turn every controller restart into refused creates
for every tenant. For the same reason a request that arrives before the store is primed is allowed
with a warning. The namespace the controller runs in is excluded (it must never wait on itself), and
so is any namespace an admin labels ``cumulo.io/admission-webhook=disabled``.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import logging
import pathlib
import typing as t

import kopf

from controllers import admission
from controllers.api.v1alpha1.common import GROUP, VERSION

log = logging.getLogger(__name__)

OPT_OUT_LABEL = "cumulo.io/admission-webhook"
"""A namespace labelled ``cumulo.io/admission-webhook=disabled`` (by an admin: tenants cannot label
their namespace) is left to the controller's conditions alone; tests of that second line use it."""
HANDLER_ID = "cumulo"
CONFIGURATION_NAME = "cumulo-validating"
WEBHOOK_NAME = "validate.cumulo.io"
STORE_LAG_SECONDS = 2.0
"""A reference missing from the store is looked for again for this long before the refusal (an object
created a moment earlier, as ``kubectl apply -f dir/`` does, may still be on its way to the store)."""


# ---------------------------------------------------------------------------------------------
# Certificates
# ---------------------------------------------------------------------------------------------


def ensure_certificates(directory: pathlib.Path, hosts: t.Sequence[str]) -> tuple[pathlib.Path, pathlib.Path, bytes]:
    """(certfile, keyfile, CA bundle PEM) from ``directory``; generated there when absent."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    certfile, keyfile, cafile = directory / "tls.crt", directory / "tls.key", directory / "ca.crt"
    if certfile.exists() and keyfile.exists():
        return certfile, keyfile, (cafile if cafile.exists() else certfile).read_bytes()
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cumulo-webhook-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=3650))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    keyfile.chmod(0o600)
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    cafile.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return certfile, keyfile, cafile.read_bytes()


# ---------------------------------------------------------------------------------------------
# The ValidatingWebhookConfiguration
# ---------------------------------------------------------------------------------------------


def configuration(client_config: dict, excluded_namespaces: t.Sequence[str] = ("cumulo-system",),
                  failure_policy: str = "Ignore") -> dict:
    """The ValidatingWebhookConfiguration (also the shape of the chart's template)."""
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": CONFIGURATION_NAME, "labels": {"app.kubernetes.io/name": "cumulo"}},
        "webhooks": [{
            "name": WEBHOOK_NAME,
            "clientConfig": client_config,
            "rules": [{"apiGroups": [GROUP], "apiVersions": [VERSION], "operations": ["CREATE", "UPDATE"],
                       "resources": sorted(admission.RULES), "scope": "Namespaced"}],
            "namespaceSelector": {"matchExpressions": [
                {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": list(excluded_namespaces)},
                {"key": OPT_OUT_LABEL, "operator": "NotIn", "values": ["disabled"]},
            ]},
            "failurePolicy": failure_policy,
            "matchPolicy": "Equivalent",
            # Quota reservations are a side effect, skipped for dry runs.
            "sideEffects": "NoneOnDryRun",
            "timeoutSeconds": 10,
            "admissionReviewVersions": ["v1"],
        }],
    }


async def register(api_client: t.Any, body: dict) -> None:
    """Create or replace the configuration (dev/test; the chart owns it in production)."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    api = client.AdmissionregistrationV1Api(api_client)

    def apply() -> None:
        try:
            current = api.read_validating_webhook_configuration(CONFIGURATION_NAME)
        except ApiException as error:
            if error.status != 404:
                raise
            api.create_validating_webhook_configuration(body)
            return
        body["metadata"]["resourceVersion"] = current.metadata.resource_version
        api.replace_validating_webhook_configuration(CONFIGURATION_NAME, body)

    await asyncio.to_thread(apply)


# ---------------------------------------------------------------------------------------------
# The handler
# ---------------------------------------------------------------------------------------------


class Validator:
    """Parses the request's objects and runs the kind's rules, then the quota, against the runtime."""

    def __init__(self, runtime: t.Callable[[], t.Any]):
        self._runtime = runtime

    async def __call__(self, plural: str, operation: str, new: dict | None, old: dict | None,
                       dry_run: bool) -> list[str]:
        """Warnings to return; raises :class:`admission.Refused` to refuse."""
        rule = admission.RULES.get(plural)
        runtime = self._runtime()
        if rule is None or new is None or operation not in ("CREATE", "UPDATE"):
            return []
        # A standby replica's store is loaded and kept current by its watches: it answers too (its quota
        # reservations are its own; the leader's ledger stays the authority behind them).
        if runtime is None or not (getattr(runtime, "loaded", False) or runtime.started.is_set()):
            return ["cumulo-controller is starting; cross-object checks are left to the controller"]
        if new.get("metadata", {}).get("deletionTimestamp"):
            return []
        kind = runtime.store.kinds[plural]
        obj = kind.parse(new)
        previous = kind.parse(old) if old is not None and operation == "UPDATE" else None
        if previous is not None and previous.spec == obj.spec:
            return []  # metadata only (finalizers, labels): nothing cross-object changed
        store = runtime.store
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STORE_LAG_SECONDS
        while True:
            try:
                rule(store, obj, previous)
                break
            except admission.Refused as refusal:
                if not refusal.reason.endswith("NotFound") or loop.time() >= deadline:
                    raise
                await asyncio.sleep(0.1)
        quotas = runtime.reconcilers.get("quotas")
        if quotas is not None:
            quotas.admit(plural, obj, previous, dry_run)
        return []


def add_arguments(parser: t.Any) -> None:
    group = parser.add_argument_group("admission webhook (see controllers/webhook.py)")
    group.add_argument("--webhook-port", type=int, default=0,
                       help="serve the validating admission webhook (HTTPS) on this port; 0: no webhook")
    group.add_argument("--webhook-addr", default="0.0.0.0", help="address the webhook listens on")
    group.add_argument("--webhook-host", default="127.0.0.1",
                       help="name or address a generated certificate is made for (and the URL kopf reports)")
    group.add_argument("--webhook-cert-dir", default="/tmp/cumulo-webhook",
                       help="tls.crt/tls.key (+ ca.crt) of the webhook; generated here when absent")
    group.add_argument("--webhook-url-base", default=None,
                       help="register the ValidatingWebhookConfiguration pointing at this URL (dev/test; the Helm "
                            "chart ships it in production)")


def install(registry: kopf.OperatorRegistry, options: t.Any, runtime: t.Callable[[], t.Any]) -> None:
    """Register the validating handler on kopf's registry (nothing without ``--webhook-port``)."""
    if not options.webhook_port:
        return
    validator = Validator(runtime)

    @kopf.on.validate(GROUP, VERSION, kopf.EVERYTHING, id=HANDLER_ID, operations=["CREATE", "UPDATE"],
                      registry=registry, side_effects=True, ignore_failures=True)
    async def validate(resource: t.Any, operation: str, new: t.Any, old: t.Any, dryrun: bool,
                       warnings: list[str], **_: t.Any) -> None:
        try:
            warnings.extend(await validator(resource.plural, operation, dict(new) if new is not None else None,
                                            dict(old) if old is not None else None, dryrun))
        except admission.Refused as refusal:
            meta = (new or {}).get("metadata", {})
            log.info("refused %s of %s %s/%s: %s", operation, resource.plural, meta.get("namespace"),
                     meta.get("name"), refusal)
            raise kopf.AdmissionError(str(refusal), code=403 if refusal.reason == "QuotaExceeded" else 422)


async def setup(settings: kopf.OperatorSettings, options: t.Any, api_client: t.Any) -> None:
    """At kopf's startup: the HTTPS server with its certificates; with ``--webhook-url-base``, the
    ValidatingWebhookConfiguration pointing at it."""
    if not options.webhook_port:
        return
    hosts = [options.webhook_host, *([] if options.webhook_host == "127.0.0.1" else ["127.0.0.1"])]
    certfile, keyfile, ca = await asyncio.to_thread(ensure_certificates, pathlib.Path(options.webhook_cert_dir), hosts)
    settings.admission.server = kopf.WebhookServer(addr=options.webhook_addr, port=options.webhook_port,
                                                   host=options.webhook_host, certfile=str(certfile),
                                                   pkeyfile=str(keyfile), cadata=ca)
    settings.admission.managed = None  # the configuration is ours (namespaceSelector), not kopf's
    if options.webhook_url_base:
        client_config = {"url": f"{options.webhook_url_base.rstrip('/')}/{HANDLER_ID}",
                         "caBundle": base64.b64encode(ca).decode()}
        await register(api_client, configuration(client_config))
        log.info("registered ValidatingWebhookConfiguration %s -> %s", CONFIGURATION_NAME, client_config["url"])
