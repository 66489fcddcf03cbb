"""Identity on Kubernetes: workload tokens checked by TokenReview, the issuer from a Secret.

* :class:`TokenReviewValidator` asks the API server whether a proxy's projected service-account
  token is valid for the audience ``identity.l5d.io`` (Linkerd's, kept so that a Linkerd proxy's
  token works here too); the answer names the service account, which must be the one the requested
  identity names. A token for another audience, an expired one, or one whose service account (or
  pod) was deleted is refused by the API server itself.
* :class:`SecretIssuer` reads the issuer from a Secret of type ``kubernetes.io/tls`` (``tls.crt``,
  ``tls.key``, ``ca.crt``: cert-manager's) or ``linkerd.io/tls`` (``crt.pem``, ``key.pem``), and the
  trust anchors from a ConfigMap (Linkerd's ``linkerd-identity-trust-roots``, key ``ca-bundle.crt``;
  without it, from the Secret's ``ca.crt``). Both are watched: a new version is validated and used
  for the next certificate, no restart; one that does not validate is logged and the last good
  issuer kept.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cryptography.hazmat.primitives import hashes

from tether.control.identity.credentials import LoadedCredentials, ReloadingIssuer, credentials_from_pem
from tether.control.identity.service import TokenSubject, Unauthenticated, Unavailable
from tether.core.identity.certs import CertificateError
from tether.core.identity.issuance import IssuancePolicy
from tether.platform.kubernetes.client import ApiResource, KubeClient, KubeError
from tether.platform.kubernetes.informer import Informer, InformerSettings

log = logging.getLogger("tether.identity")

DEFAULT_AUDIENCE = "identity.l5d.io"
DEFAULT_ISSUER_SECRET = "linkerd-identity-issuer"
DEFAULT_TRUST_ROOTS_CONFIGMAP = "linkerd-identity-trust-roots"
TRUST_ROOTS_KEY = "ca-bundle.crt"
TOKEN_REVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"
SA_PREFIX = "system:serviceaccount:"

SECRETS = ApiResource("", "v1", "secrets", "Secret")
CONFIG_MAPS = ApiResource("", "v1", "configmaps", "ConfigMap")

# Secret type -> (certificate key, private key key)
ISSUER_SCHEMES = {"kubernetes.io/tls": ("tls.crt", "tls.key"), "linkerd.io/tls": ("crt.pem", "key.pem")}


class TokenReviewValidator:
    """A TokenValidator that asks the API server (TokenReview) about a projected service-account token."""

    def __init__(self, client: KubeClient, audiences: Sequence[str] = (DEFAULT_AUDIENCE,)) -> None:
        self.client = client
        self.audiences = list(audiences)

    async def validate(self, token: bytes) -> TokenSubject:
        try:
            text = token.decode("ascii").strip()
        except UnicodeDecodeError:
            raise Unauthenticated("the token is not a service-account token (not ASCII)") from None
        review = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": text, "audiences": self.audiences},
        }
        try:
            answer = await self.client.create(TOKEN_REVIEWS, review)
        except KubeError as e:
            # The API server could not say: the proxy retries, as with any unavailable CA.
            raise Unavailable(f"cannot review the token with the API server: {e}") from None
        status = (answer or {}).get("status") or {}
        if not status.get("authenticated"):
            why = status.get("error") or "the API server did not authenticate it"
            raise Unauthenticated(f"token refused by TokenReview (audience {', '.join(self.audiences)}): {why}")
        if not set(status.get("audiences") or self.audiences) & set(self.audiences):
            raise Unauthenticated(f"the token is not for audience {', '.join(self.audiences)}")
        username = str((status.get("user") or {}).get("username") or "")
        if not username.startswith(SA_PREFIX) or username.count(":") != 3:
            raise Unauthenticated(f"the token belongs to {username or 'nobody'!r}, not a service account")
        ns, sa = username[len(SA_PREFIX):].split(":")
        extra = (status.get("user") or {}).get("extra") or {}
        pod = (extra.get("authentication.kubernetes.io/pod-name") or [""])[0]
        who = f"pod {ns}/{pod}" if pod else f"service account {ns}/{sa}"
        return TokenSubject(namespace=ns, service_account=sa, description=who)


def secret_value(secret: Mapping[str, Any], key: str) -> bytes | None:
    """A Secret's value for ``key``, decoded; None when absent or not base64."""
    raw = (secret.get("data") or {}).get(key)
    if raw is None:
        return None
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        return None


def credentials_from_objects(secret: Mapping[str, Any] | None, roots: Mapping[str, Any] | None,
                             names: tuple[str, str, str | None], now: dt.datetime) -> LoadedCredentials:
    """The issuer from a Secret and the anchors from a ConfigMap (or the Secret's ca.crt when
    ``names[2]`` is None); CertificateError naming the object and key that is wrong."""
    ns, secret_name, roots_name = names
    where = f"Secret {ns}/{secret_name}"
    if secret is None:
        raise CertificateError(
            f"{where} not found: create the issuer Secret (type kubernetes.io/tls or linkerd.io/tls)"
        )
    type_ = str(secret.get("type") or "")
    if type_ not in ISSUER_SCHEMES:
        raise CertificateError(
            f"{where} has type {type_ or '(none)'!r}: want kubernetes.io/tls (tls.crt, tls.key, ca.crt) "
            "or linkerd.io/tls (crt.pem, key.pem)"
        )
    cert_key, key_key = ISSUER_SCHEMES[type_]
    cert, key = secret_value(secret, cert_key), secret_value(secret, key_key)
    for value, k in ((cert, cert_key), (key, key_key)):
        if not value:
            raise CertificateError(f"{where}: key {k} is missing or not base64")
    if roots_name is not None:
        rwhere = f"ConfigMap {ns}/{roots_name}"
        if roots is None:
            raise CertificateError(f"{rwhere} not found: it holds the trust anchors ({TRUST_ROOTS_KEY})")
        anchors_text = (roots.get("data") or {}).get(TRUST_ROOTS_KEY)
        if not anchors_text:
            raise CertificateError(f"{rwhere}: key {TRUST_ROOTS_KEY} is missing")
        anchors, anchors_src = str(anchors_text).encode(), f"{rwhere} key {TRUST_ROOTS_KEY}"
    else:
        ca = secret_value(secret, "ca.crt")
        if not ca:
            raise CertificateError(f"{where}: key ca.crt is missing (or name the trust-anchors ConfigMap)")
        anchors, anchors_src = ca, f"{where} key ca.crt"
    assert cert is not None and key is not None
    return credentials_from_pem(cert, key, anchors, now, (f"{where} key {cert_key}", f"{where} key {key_key}",
                                                          anchors_src))


class _One:
    """Informer handler that keeps the one object a field selector picks."""

    def __init__(self, changed: Callable[[], None]) -> None:
        self.obj: Mapping[str, Any] | None = None
        self._changed = changed

    def replace(self, items: Sequence[Mapping[str, Any]]) -> None:
        self.obj = items[0] if items else None
        self._changed()

    def event(self, type_: str, obj: Mapping[str, Any]) -> None:
        self.obj = None if type_ == "DELETED" else obj
        self._changed()


class SecretIssuer(ReloadingIssuer):
    """The issuer from a watched Secret (and anchors from a watched ConfigMap). Build with :meth:`load`."""

    fix_hint = "update the issuer Secret with an issuer valid now (cert-manager renews it before it expires)"
    source_name = "the issuer Secret or trust-anchors ConfigMap"

    def __init__(self, client: KubeClient, namespace: str, secret: str, roots: str | None,
                 policy: IssuancePolicy, now: Callable[[], dt.datetime],
                 settings: InformerSettings | None = None) -> None:
        self.client = client
        self.names = (namespace, secret, roots)
        self._loading = True
        self._secret = _One(self._changed)
        self._roots = _One(self._changed)
        self.informers = [
            Informer(client, SECRETS, self._secret, namespace=namespace, field_selector=f"metadata.name={secret}",
                     settings=settings),
        ]
        if roots is not None:
            self.informers.append(Informer(client, CONFIG_MAPS, self._roots, namespace=namespace,
                                           field_selector=f"metadata.name={roots}", settings=settings))
        self._policy, self._now = policy, now

    @classmethod
    async def load(cls, client: KubeClient, namespace: str, secret: str = DEFAULT_ISSUER_SECRET,
                   roots: str | None = DEFAULT_TRUST_ROOTS_CONFIGMAP, *, policy: IssuancePolicy,
                   now: Callable[[], dt.datetime], settings: InformerSettings | None = None) -> SecretIssuer:
        """Read the Secret (and ConfigMap) once; CertificateError when there is no valid issuer to start with,
        KubeError when the API server cannot be read."""
        self = cls(client, namespace, secret, roots, policy, now, settings)
        for inf in self.informers:
            await inf.list_once()
        self._loading = False
        loaded = credentials_from_objects(self._secret.obj, self._roots.obj, self.names, now())
        ReloadingIssuer.__init__(self, loaded, policy, now)
        return self

    def _changed(self) -> None:
        if self._loading:
            return
        try:
            loaded = credentials_from_objects(self._secret.obj, self._roots.obj, self.names, self.now())
        except CertificateError as e:
            self.refused(str(e))
            return
        cur = self.current
        if (loaded.issuer.certificate == cur.issuer.certificate
                and [a.fingerprint(hashes.SHA256()) for a in loaded.bundle.anchors]
                == [a.fingerprint(hashes.SHA256()) for a in cur.bundle.anchors]):
            return  # the same issuer re-sent (a resync, or an unrelated edit)
        self.replaced(loaded)

    async def run(self, stop: asyncio.Event) -> None:
        """Watch the Secret and ConfigMap until ``stop`` is set."""
        async with asyncio.TaskGroup() as tg:
            for inf in self.informers:
                tg.create_task(inf.run(stop))

