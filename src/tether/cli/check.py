"""`tether check`: health checks as data.

A run is a list of categories (Linkerd's names: ``linkerd-existence``, ``linkerd-identity``, ...);
each category is a list of checkers with a description, a hint, and whether a failure is fatal
(stop the run: later checks depend on this one) or only a warning. A checker is a function that
returns normally on success or raises CheckFailed. Which categories run is data too: ``default``
categories run always, ``proxy`` ones with ``--proxy``, ``pre`` ones with ``--pre``.

Exit status: 0 when no check failed with an error (warnings allowed), 1 otherwise, so that an
expired certificate fails a CI job or a cron alert instead of printing a warning nobody reads.
A run that would check nothing (``--pre`` today) fails and says so.
"""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

import click
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tether import __version__
from tether.cli.errors import OperationFailed
from tether.cli.output import dump, output_option
from tether.cli.params import DNS_LABEL, POSITIVE_DURATION, platform_options, state_dir_option

HINT_BASE = "https://linkerd.io/2/checks/#"
# Linkerd's marks; spelled as escapes so no reader mistakes them for letters.
MARK_OK, MARK_WARN, MARK_ERR = "\u221a", "\u203c", "\u00d7"
EXPIRY_WARNING = dt.timedelta(days=60)
# What `--pre` would check on Kubernetes (Linkerd's categories), none of which exists here yet.
PRE_KUBERNETES = ("kubernetes-api", "kubernetes-version", "pre-kubernetes-setup")

# "local" and "local-proxy" run like "default" and "proxy" when the state directory holds a local mesh.
# "kube-base" runs first on Kubernetes (reaching the API server), then "kube-pre" with --pre, else
# "kube" and, with --proxy, "kube-proxy" (tether.cli.check_kube).
Mode = Literal["default", "proxy", "pre", "local", "local-proxy", "kube-base", "kube-pre", "kube", "kube-proxy"]
KUBE_MODES = ("kube-base", "kube-pre", "kube", "kube-proxy")


class CheckFailed(Exception):
    """A checker's verdict: the message says what is wrong, in one or a few lines."""


@dataclass
class CheckOptions:
    """What the flags say about where to look."""

    state_dir: str = ".tether"
    identity_issuer_dir: str | None = None
    identity_trust_anchors_file: str | None = None
    identity_issuer_certificate_file: str | None = None
    namespace: str | None = None  # data-plane checks: only this namespace's workloads
    timeout: float = 5.0  # per probe of a running process
    platform: str = "local"
    kubeconfig: str | None = None
    kube_context: str | None = None
    controller_namespace: str = "linkerd"


@dataclass
class CheckContext:
    """What checkers see: the options, the time, and a cache checkers share within a run."""

    options: CheckOptions
    now: dt.datetime
    cache: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Checker:
    description: str
    check: Callable[[CheckContext], None]
    hint: str = ""  # an anchor under HINT_BASE, or a full sentence/URL
    fatal: bool = False  # a failure stops the run: later checks depend on this one
    warning: bool = False  # a failure is a warning, not an error


@dataclass(frozen=True)
class Category:
    name: str
    checkers: tuple[Checker, ...]
    mode: Mode = "default"


CATEGORIES: list[Category] = []


def register_category(category: Category) -> None:
    kube = category.mode in KUBE_MODES
    if any(c.name == category.name and (c.mode in KUBE_MODES) == kube for c in CATEGORIES):
        raise ValueError(f"check category {category.name!r} is registered twice")
    CATEGORIES.append(category)


@dataclass
class Outcome:
    category: str
    checker: Checker
    error: str | None  # None: passed

    @property
    def status(self) -> str:
        if self.error is None:
            return "ok"
        return "warning" if self.checker.warning else "error"


def run_checks(categories: list[Category], ctx: CheckContext, out: TextIO | None = None) -> tuple[list[Outcome], bool]:
    """Run the categories in order; returns the outcomes and whether the run succeeded."""
    outcomes: list[Outcome] = []
    ok = True
    for cat in categories:
        if out:
            out.write(f"{cat.name}\n{'-' * len(cat.name)}\n")
        for checker in cat.checkers:
            try:
                checker.check(ctx)
                outcome = Outcome(cat.name, checker, None)
            except CheckFailed as e:
                outcome = Outcome(cat.name, checker, str(e))
            outcomes.append(outcome)
            if out:
                _print(out, outcome)
            if outcome.status == "error":
                ok = False
                if checker.fatal:
                    if out:
                        out.write(f"\nStatus check results are {MARK_ERR}\n")
                    return outcomes, False
        if out:
            out.write("\n")
    if out:
        out.write(f"Status check results are {MARK_OK if ok else MARK_ERR}\n")
    return outcomes, ok


def _hint_url(hint: str) -> str:
    return HINT_BASE + hint if hint and "/" not in hint and " " not in hint else hint


def _print(out: TextIO, o: Outcome) -> None:
    mark = {"ok": MARK_OK, "warning": MARK_WARN, "error": MARK_ERR}[o.status]
    out.write(f"{mark} {o.checker.description}\n")
    if o.error is not None:
        for line in o.error.splitlines():
            out.write(f"    {line}\n")
        hint = _hint_url(o.checker.hint)
        if hint.startswith("https://"):
            out.write(f"    see {hint} for hints\n")
        elif hint:
            out.write(f"    hint: {hint}\n")


def json_result(categories: list[Category], outcomes: list[Outcome], ok: bool) -> dict[str, Any]:
    """Linkerd's `check -o json` shape: success, then categories with their checks' results."""
    by_cat: dict[str, list[dict[str, Any]]] = {c.name: [] for c in categories}
    for o in outcomes:
        entry: dict[str, Any] = {
            "description": o.checker.description,
            "hint": _hint_url(o.checker.hint),
            "result": {"ok": "success", "warning": "warning", "error": "error"}[o.status],
        }
        if o.error is not None:
            entry["error"] = o.error
        by_cat[o.category].append(entry)
    return {
        "success": ok,
        "categories": [{"categoryName": name, "checks": checks} for name, checks in by_cat.items() if checks],
    }


# -- local state: the control plane's records and the workload registry ----------------------------


def _records(ctx: CheckContext) -> list[Any]:
    if "records" not in ctx.cache:
        from tether.platform.local.controlplane import ControlPlaneRecordError, read_records

        try:
            ctx.cache["records"] = read_records(ctx.options.state_dir, "identity")
        except ControlPlaneRecordError as e:
            raise CheckFailed(str(e)) from None
    return list(ctx.cache["records"])


def _probe(addr: str, path: str, ctx: CheckContext) -> str | None:
    """None if ``GET addr/path`` answers 200, else why not."""
    from tether.cli.probe import ProbeError, get

    try:
        status, body = get(addr, path, ctx.options.timeout)
    except ProbeError as e:
        return str(e)
    if status != 200:
        return f"http://{addr}{path}: HTTP {status} {body[:80].decode(errors='replace').strip()}"
    return None


# -- linkerd-existence -----------------------------------------------------------------------------


def _cp_recorded(ctx: CheckContext) -> None:
    if not _records(ctx):
        raise CheckFailed(
            f"no identity service recorded in {Path(ctx.options.state_dir) / 'control-plane'}: start one with "
            f"`tether controller identity --state-dir {ctx.options.state_dir} ...`, or pass the --state-dir it uses"
        )


def _cp_running(ctx: CheckContext) -> None:
    from tether.platform.local.controlplane import records_dir

    problems = []
    for r in _records(ctx):
        if p := _probe(r.admin_addr, "/live", ctx):
            record = records_dir(ctx.options.state_dir) / f"{r.component}-{r.pid}.json"
            problems.append(f"pid {r.pid}: {p} (if that process is gone, remove its record {record})")
    if problems:
        some = "no" if len(problems) == len(_records(ctx)) else "not every"
        raise CheckFailed(f"{some} identity service replica answers:\n" + "\n".join(problems))


def _cp_ready(ctx: CheckContext) -> None:
    problems = [f"pid {r.pid}: {p}" for r in _records(ctx) if (p := _probe(r.admin_addr, "/ready", ctx))]
    if problems:
        raise CheckFailed("\n".join(problems))


EXISTENCE = Category(
    "linkerd-existence",
    (
        Checker("control plane is recorded in the state directory", _cp_recorded,
                "start it with `tether controller identity --state-dir STATE_DIR`", fatal=True),
        Checker("control plane processes are running", _cp_running,
                "its log says why it stopped; restart it with the same --state-dir", fatal=True),
        Checker("control plane processes are ready", _cp_ready,
                "an identity service is ready once it serves with a valid issuer: see its log"),
    ),
)


# -- linkerd-identity ------------------------------------------------------------------------------


def _identity_files(ctx: CheckContext) -> tuple[str | None, str | None]:
    """(trust anchors, issuer certificate): flags, else the running service's, else <state-dir>/identity."""
    o = ctx.options
    anchors, issuer = o.identity_trust_anchors_file, o.identity_issuer_certificate_file
    d = o.identity_issuer_dir
    if d is None and not (anchors and issuer):
        try:
            records = _records(ctx)
        except CheckFailed:
            records = []
        if records:
            anchors = anchors or records[0].trust_anchors or None
            issuer = issuer or records[0].issuer_certificate or None
        default_dir = Path(o.state_dir) / "identity"
        if default_dir.is_dir():
            d = str(default_dir)
    if d:
        dp = Path(d)
        issuer = issuer or str(dp / "tls.crt" if (dp / "tls.crt").exists() else dp / "crt.pem")
        anchors = anchors or str(dp / "ca.crt")
    return anchors, issuer


def _load_identity(ctx: CheckContext) -> None:
    from tether.core.identity.certs import CertificateError, TrustBundle, parse_certificates

    anchors_file, issuer_file = _identity_files(ctx)
    if not anchors_file or not issuer_file:
        raise CheckFailed(
            "no identity certificates to check: no identity service recorded in the state directory; pass "
            "--identity-issuer-dir DIR, or --identity-trust-anchors-file and --identity-issuer-certificate-file"
        )
    try:
        bundle = TrustBundle.from_pem(Path(anchors_file).read_bytes(), anchors_file)
        issuer_certs = parse_certificates(Path(issuer_file).read_bytes(), issuer_file)
    except OSError as e:
        raise CheckFailed(f"cannot read {e.filename}: {e.strerror}") from None
    except CertificateError as e:
        raise CheckFailed(str(e)) from None
    ctx.cache["anchors"] = bundle
    ctx.cache["issuer"] = issuer_certs[0]
    ctx.cache["issuer_chain"] = tuple(issuer_certs[1:])


def _issuer_named(ctx: CheckContext) -> None:
    """The issuer's CN is identity.<cp-ns>.<trust-domain> of the running service (when one is recorded)."""
    from cryptography.x509.oid import NameOID

    try:
        records = _records(ctx)
    except CheckFailed:
        records = []
    if not records:
        return
    rec = records[0]
    expected = f"identity.{rec.controller_namespace}.{rec.trust_domain}"
    issuer = ctx.cache["issuer"]
    names = [str(a.value) for a in issuer.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if expected not in names:
        raise CheckFailed(
            f"the issuer is named {', '.join(names) or '(no CN)'}, but the identity service names workloads in "
            f"control-plane namespace {rec.controller_namespace!r} and trust domain {rec.trust_domain!r} "
            f"(expected {expected}): were the issuer and the service set up with different "
            "--controller-namespace or --identity-trust-domain?"
        )


def _algorithm_problem(cert: x509.Certificate) -> str | None:
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name in ("secp256r1", "secp384r1"):
            return None
        return f"uses ECDSA on {key.curve.name}; use P-256"
    if isinstance(key, rsa.RSAPublicKey):
        return None if key.key_size >= 2048 else f"uses a {key.key_size}-bit RSA key; use ECDSA P-256"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return None
    return f"uses an unsupported key type {type(key).__name__}; use ECDSA P-256"


def _anchors_algorithm(ctx: CheckContext) -> None:
    from tether.core.identity.certs import describe

    anchors = ctx.cache["anchors"].anchors
    problems = [f"{describe(a, 'anchor')} {p}" for a in anchors if (p := _algorithm_problem(a))]
    if problems:
        raise CheckFailed("\n".join(problems))


def _anchors_valid(ctx: CheckContext) -> None:
    from tether.core.identity.certs import validity_problem

    anchors = ctx.cache["anchors"].anchors
    problems = [p for a in anchors if (p := validity_problem(a, ctx.now, "trust anchor"))]
    if problems:
        raise CheckFailed("\n".join(problems))


def _expires_soon(cert: x509.Certificate, now: dt.datetime, role: str) -> str | None:
    from tether.core.identity.certs import describe

    left = cert.not_valid_after_utc - now
    if dt.timedelta(0) < left < EXPIRY_WARNING:
        return f"{describe(cert, role)} expires in {left.days} days"
    return None


def _anchors_60_days(ctx: CheckContext) -> None:
    problems = [p for a in ctx.cache["anchors"].anchors if (p := _expires_soon(a, ctx.now, "trust anchor"))]
    if problems:
        raise CheckFailed("\n".join(problems) + "\nRotate the anchor: docs/notes/issue-3.md, anchor rotation")


def _issuer_algorithm(ctx: CheckContext) -> None:
    from tether.core.identity.certs import describe

    if p := _algorithm_problem(ctx.cache["issuer"]):
        raise CheckFailed(f"{describe(ctx.cache['issuer'], 'issuer')} {p}")


def _issuer_valid(ctx: CheckContext) -> None:
    from tether.core.identity.certs import validity_problem

    if p := validity_problem(ctx.cache["issuer"], ctx.now, "issuer"):
        raise CheckFailed(p + "\nIssue a new issuer from the trust anchor: tether identity create-issuer")


def _issuer_60_days(ctx: CheckContext) -> None:
    if p := _expires_soon(ctx.cache["issuer"], ctx.now, "issuer"):
        raise CheckFailed(p + "\nIssue a new issuer before then: tether identity create-issuer")


def _issuer_signed(ctx: CheckContext) -> None:
    from tether.core.identity.certs import CertificateError, chain_to_anchor

    issuer = ctx.cache["issuer"]
    # Dates are checked by their own checkers; here only the signature path matters.
    at = max(issuer.not_valid_before_utc, min(ctx.now, issuer.not_valid_after_utc - dt.timedelta(seconds=1)))
    try:
        chain_to_anchor(issuer, ctx.cache["issuer_chain"], ctx.cache["anchors"], at, "issuer")
    except CertificateError as e:
        raise CheckFailed(str(e)) from None


IDENTITY = Category(
    "linkerd-identity",
    (
        Checker("certificate config is valid", _load_identity, "l5d-identity-cert-config-valid", fatal=True),
        Checker(
            "trust anchors are using supported crypto algorithm",
            _anchors_algorithm,
            "l5d-identity-trustAnchors-use-supported-crypto",
            fatal=True,
        ),
        Checker(
            "trust anchors are within their validity period",
            _anchors_valid,
            "l5d-identity-trustAnchors-are-time-valid",
            fatal=True,
        ),
        Checker(
            "trust anchors are valid for at least 60 days",
            _anchors_60_days,
            "l5d-identity-trustAnchors-not-expiring-soon",
            warning=True,
        ),
        Checker(
            "issuer cert is using supported crypto algorithm",
            _issuer_algorithm,
            "l5d-identity-issuer-cert-uses-supported-crypto",
            fatal=True,
        ),
        Checker(
            "issuer cert is within its validity period",
            _issuer_valid,
            "l5d-identity-issuer-cert-is-time-valid",
            fatal=True,
        ),
        Checker(
            "issuer cert is valid for at least 60 days",
            _issuer_60_days,
            "l5d-identity-issuer-cert-not-expiring-soon",
            warning=True,
        ),
        Checker(
            "issuer cert is issued by the trust anchor",
            _issuer_signed,
            "l5d-identity-issuer-cert-issued-by-trust-anchor",
        ),
        Checker(
            "issuer cert is named for the control plane's namespace and trust domain",
            _issuer_named,
            "the issuer's CN must be identity.<controller-namespace>.<trust-domain>",
            warning=True,
        ),
    ),
)


# -- control-plane-version -------------------------------------------------------------------------


def _cp_version(ctx: CheckContext) -> None:
    versions = {r.version for r in _records(ctx)}
    if versions != {__version__}:
        raise CheckFailed(f"control plane runs {', '.join(sorted(versions)) or 'nothing'}, "
                          f"this CLI is {__version__}")


CONTROL_PLANE_VERSION = Category(
    "control-plane-version",
    (Checker("control plane and cli versions match", _cp_version, "l5d-version-control", warning=True),),
)


# -- linkerd-data-plane, linkerd-identity-data-plane (--proxy) -------------------------------------


def _proxies(ctx: CheckContext) -> list[Any]:
    if "proxies" not in ctx.cache:
        from tether.platform.local.workloads import WorkloadError, WorkloadRegistry

        try:
            workloads = WorkloadRegistry(ctx.options.state_dir).list(ctx.options.namespace)
        except WorkloadError as e:
            raise CheckFailed(str(e)) from None
        ctx.cache["proxies"] = [w for w in workloads if w.proxy_admin]
        ctx.cache["unreachable"] = [w for w in workloads if not w.proxy_admin]
    return list(ctx.cache["proxies"])


def _dp_found(ctx: CheckContext) -> None:
    if not _proxies(ctx):
        where = f"namespace {ctx.options.namespace}" if ctx.options.namespace else "any namespace"
        raise CheckFailed(
            f"no workload in {ctx.options.state_dir} ({where}) has a proxyAdmin address, so no proxy can be checked: "
            "`tether workload register NAME --proxy-admin HOST:PORT` records one"
        )


def _dp_ready(ctx: CheckContext) -> None:
    problems = [f"{w.key}: {p}" for w in _proxies(ctx) if (p := _probe(str(w.proxy_admin), "/ready", ctx))]
    if problems:
        raise CheckFailed("\n".join(problems))


def _dp_versions(ctx: CheckContext) -> None:
    from tether.cli.probe import ProbeError, proxy_version

    problems = []
    for w in _proxies(ctx):
        try:
            v = proxy_version(str(w.proxy_admin), ctx.options.timeout)
        except ProbeError as e:
            problems.append(f"{w.key}: {e}")
            continue
        if v != __version__:
            problems.append(f"{w.key}: proxy {v}, cli {__version__}")
    if problems:
        raise CheckFailed("\n".join(problems))


def _dp_certificates(ctx: CheckContext) -> None:
    import json

    from tether.cli.probe import ProbeError, get
    from tether.core.identity.certs import CertificateError, TrustBundle, chain_to_anchor, parse_certificates

    bundle = ctx.cache.get("anchors")
    if bundle is None:
        anchors_file, _ = _identity_files(ctx)
        if not anchors_file:
            raise CheckFailed("no trust anchors to check against: pass --identity-trust-anchors-file")
        try:
            bundle = TrustBundle.from_pem(Path(anchors_file).read_bytes(), anchors_file)
        except (OSError, CertificateError) as e:
            raise CheckFailed(f"{anchors_file}: {e}") from None
    problems = []
    for w in _proxies(ctx):
        try:
            status, body = get(str(w.proxy_admin), "/identity.json", ctx.options.timeout)
            doc = json.loads(body) if status == 200 else {}
        except (ProbeError, ValueError) as e:
            problems.append(f"{w.key}: {e}")
            continue
        pem = str(doc.get("certificate_chain_pem") or "")
        if not pem:
            problems.append(f"{w.key}: the proxy has no certificate (identity {doc.get('identity') or 'not set'})")
            continue
        try:
            chain = parse_certificates(pem.encode(), f"{w.key} /identity.json")
            chain_to_anchor(chain[0], tuple(chain[1:]), bundle, ctx.now, f"{w.key}'s certificate")
        except CertificateError as e:
            problems.append(f"{w.key}: {e}")
    if problems:
        raise CheckFailed("\n".join(problems))


DATA_PLANE = Category(
    "linkerd-data-plane",
    (
        Checker("data plane proxies are registered with their admin addresses", _dp_found,
                "`tether workload register NAME --proxy-admin HOST:PORT`", fatal=True),
        Checker("data plane proxies are ready", _dp_ready, "l5d-data-plane-ready"),
        Checker("data plane proxies and cli versions match", _dp_versions, "l5d-data-plane-cli-version",
                warning=True),
    ),
    mode="proxy",
)

IDENTITY_DATA_PLANE = Category(
    "linkerd-identity-data-plane",
    (Checker("data plane proxies certificate match CA", _dp_certificates,
             "l5d-identity-data-plane-proxies-certs-match-ca"),),
    mode="proxy",
)

# -- tether-local, tether-local-data-plane (a local mesh: `tether up`) ---------------------------------


def _mesh(ctx: CheckContext) -> tuple[Any, Any]:
    """The local mesh's layout and settings."""
    from tether.platform.local.layout import Layout, LayoutError

    layout = Layout(ctx.options.state_dir)
    try:
        return layout, layout.read_settings()
    except LayoutError as e:
        raise CheckFailed(str(e)) from None


def _local_supervisor(ctx: CheckContext) -> None:
    layout, _ = _mesh(ctx)
    if layout.supervisor_pid() is None:
        raise CheckFailed(f"no supervisor runs for {layout.root} (tether up --state-dir {layout.root})")


def _local_components(ctx: CheckContext) -> None:
    _, settings = _mesh(ctx)
    problems = []
    for kind, admins in (("identity", settings.identity_admin_addrs),
                         ("destination", settings.destination_admin_addrs)):
        for i, admin in enumerate(admins):
            for path in ("/live", "/ready"):
                if (p := _probe(admin, path, ctx)) is not None:
                    problems.append(f"{kind}-{i}: {p}")
                    break
    if problems:
        raise CheckFailed("\n".join(problems))


def _local_state_private(ctx: CheckContext) -> None:
    import stat

    layout, settings = _mesh(ctx)
    problems = []
    mode = layout.root.stat().st_mode
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        problems.append(f"{layout.root} is writable by others (mode {stat.filemode(mode)}): anyone could add workloads")
    tokens = layout.root / "tokens"
    for path in [tokens, *tokens.glob("*")] if tokens.is_dir() else []:
        if path.stat().st_mode & 0o077:
            problems.append(f"{path}: mode {stat.filemode(path.stat().st_mode)}, want 0700")
    for path in tokens.glob("*/*.token") if tokens.is_dir() else []:
        if path.stat().st_mode & 0o077:
            problems.append(f"{path}: mode {stat.filemode(path.stat().st_mode)}, want 0600 (a bootstrap token)")
    key = Path(settings.issuer_key)
    if key.exists() and key.stat().st_mode & 0o077:
        problems.append(f"{key}: mode {stat.filemode(key.stat().st_mode)}, want 0600 (the issuer's private key)")
    if problems:
        raise CheckFailed("\n".join(problems))


def _local_pods(ctx: CheckContext) -> list[dict[str, Any]]:
    layout, _ = _mesh(ctx)
    pods = [p for p in layout.read_status().get("pods", [])
            if ctx.options.namespace is None or p["namespace"] == ctx.options.namespace]
    return pods


def _local_pods_ready(ctx: CheckContext) -> None:
    problems = []
    for p in _local_pods(ctx):
        name = f"{p['namespace']}/{p['name']}"
        if p["phase"] != "Running":
            problems.append(f"{name}: {p['phase']}" + (f" ({p['message']})" if p.get("message") else ""))
        elif p["meshed"] and (why := _probe(p["proxyAdmin"], "/ready", ctx)) is not None:
            problems.append(f"{name}: proxy not ready: {why}")
    if problems:
        raise CheckFailed("\n".join(problems))


def _meshed_proxies_answer(ctx: CheckContext, path: str, problems: list[str]) -> Iterator[tuple[str, int, bytes]]:
    """(pod, status, body) of ``path`` on the admin port of each running meshed pod's proxy; a proxy
    that does not answer is a problem of its pod."""
    from tether.cli.probe import ProbeError, get

    for p in _local_pods(ctx):
        if not p["meshed"] or p["phase"] != "Running":
            continue
        name = f"{p['namespace']}/{p['name']}"
        try:
            status, body = get(p["proxyAdmin"], path, ctx.options.timeout)
        except ProbeError as e:
            problems.append(f"{name}: {e}")
            continue
        yield name, status, body


def _local_certified_and_clock(ctx: CheckContext) -> None:
    """Every meshed pod's proxy holds a certificate, valid now by this host's clock: a control plane
    whose clock runs ahead issues certificates that start in the future (beyond the 20 s skew
    allowance), one running behind issues certificates already past their start."""
    import json

    from tether.core.identity.certs import CertificateError, parse_certificates

    problems: list[str] = []
    for name, status, body in _meshed_proxies_answer(ctx, "/identity.json", problems):
        try:
            pem = str((json.loads(body) if status == 200 else {}).get("certificate_chain_pem") or "")
        except ValueError as e:
            problems.append(f"{name}: {e}")
            continue
        if not pem:
            problems.append(f"{name}: its proxy has no certificate")
            continue
        try:
            leaf = parse_certificates(pem.encode(), f"{name} /identity.json")[0]
        except CertificateError as e:
            problems.append(f"{name}: {e}")
            continue
        if leaf.not_valid_before_utc > ctx.now:
            problems.append(f"{name}: its certificate starts at {leaf.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}, "
                            f"after this host's clock ({ctx.now:%Y-%m-%dT%H:%M:%SZ}): the clocks disagree")
        elif leaf.not_valid_after_utc <= ctx.now:
            problems.append(f"{name}: its certificate expired at {leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}")
    if problems:
        raise CheckFailed("\n".join(problems))


def _local_proxy_python(ctx: CheckContext) -> None:
    """Every meshed pod's proxy runs the Python this command runs (``proxy_build_info``'s
    python_version). A transparent pod's proxy runs as uid 2102: where that user cannot read the
    interpreter's own libraries (a Python installed under /root, mode 0700), the loader takes the
    system's libpython and standard library instead, a Python the proxy was not built or tested with."""
    import re

    from tether.core.sidecar import python_version

    mine = python_version()
    problems: list[str] = []
    for name, status, body in _meshed_proxies_answer(ctx, "/metrics", problems):
        m = re.search(r'^proxy_build_info\{[^}]*python_version="([^"]*)"', body.decode("utf-8", "replace"), re.M)
        if status != 200 or m is None:
            problems.append(f"{name}: its proxy's /metrics names no python_version (answered {status})")
        elif m.group(1) != mine:
            problems.append(f"{name}: its proxy runs Python {m.group(1)}, this command {mine} ({sys.executable}): "
                            "the proxy's uid 2102 cannot read that interpreter's libraries and got the system's")
    if problems:
        raise CheckFailed("\n".join(problems))


LOCAL = Category(
    "tether-local",
    (
        Checker("the local mesh's supervisor is running", _local_supervisor, "tether up --state-dir DIR",
                fatal=True),
        Checker("control plane components are up and serving", _local_components, "tether status; tether logs",
                fatal=True),
        Checker("state directory, tokens and issuer key are private", _local_state_private,
                "chmod go-w STATE_DIR; chmod 0700 STATE_DIR/tokens; chmod 0600 the token and key files"),
    ),
    mode="local",
)

LOCAL_DATA_PLANE = Category(
    "tether-local-data-plane",
    (
        Checker("every pod is running with its proxy ready", _local_pods_ready,
                "tether status; tether logs NAME -c proxy"),
        Checker("every meshed pod's proxy is certified, valid by this host's clock", _local_certified_and_clock,
                "check the clocks of the hosts (timedatectl) and tether logs NAME -c proxy"),
        Checker("every meshed pod's proxy runs this Python", _local_proxy_python,
                "install Python and tether where uid 2102 can read them (not under /root), then tether down; "
                "tether up", warning=True),
    ),
    mode="local-proxy",
)

for _cat in (EXISTENCE, IDENTITY, CONTROL_PLANE_VERSION, DATA_PLANE, IDENTITY_DATA_PLANE, LOCAL, LOCAL_DATA_PLANE):
    register_category(_cat)


# -- the command -----------------------------------------------------------------------------------


def _categories(pre: bool, proxy: bool, names: tuple[str, ...], local: bool = False,
                kube: bool = False) -> list[Category]:
    if kube:
        import tether.cli.check_kube  # noqa: F401 - registers the Kubernetes categories

        base = [c for c in CATEGORIES if c.mode == "kube-base"]
        if names:
            known = {c.name: c for c in CATEGORIES if c.mode in KUBE_MODES}
            return base + [known[n] for n in dict.fromkeys(names) if known[n] not in base]
        modes = {"kube-pre"} if pre else {"kube", *(("kube-proxy",) if proxy else ())}
        return base + [c for c in CATEGORIES if c.mode in modes]
    if names:
        known = {c.name: c for c in CATEGORIES if c.mode not in KUBE_MODES}
        return [known[n] for n in dict.fromkeys(names)]
    if pre:
        return [c for c in CATEGORIES if c.mode == "pre"]
    modes = {"default", *(("proxy",) if proxy else ()), *(("local",) if local else ()),
             *(("local-proxy",) if local and proxy else ())}
    return [c for c in CATEGORIES if c.mode in modes]


def _check_category(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    if value:
        import tether.cli.check_kube  # noqa: F401 - registers the Kubernetes categories
    known = list(dict.fromkeys(c.name for c in CATEGORIES))
    for name in value:
        if name not in known:
            raise click.BadParameter(f"{name!r} is not a check category (one of: {', '.join(known)})", ctx, param)
    return value


@click.command("check", short_help="check the installation and, with --proxy, the data plane")
@click.option("--pre", is_flag=True, help="only the pre-installation checks")
@click.option("--proxy", is_flag=True, help="also check the data plane: every registered workload's proxy")
@click.option("--category", "categories", multiple=True, callback=_check_category, metavar="NAME",
              help="run only this category (repeatable; the names are listed above)")
@click.option("-n", "--namespace", type=DNS_LABEL, help="with --proxy: only this namespace's workloads  [default: all]")
@state_dir_option
@click.option("--identity-issuer-dir", type=click.Path(file_okay=False),
              help="issuer directory (tls.crt and ca.crt, or crt.pem)  [default: the running identity "
              "service's files, else STATE_DIR/identity]")
@click.option("--identity-trust-anchors-file", metavar="PATH", help="PEM bundle of trust anchors")
@click.option("--identity-issuer-certificate-file", metavar="PATH", help="PEM issuer certificate")
@click.option("--timeout", type=POSITIVE_DURATION, default="5s", show_default=True,
              help="time allowed for each running process's answer")
@platform_options
@click.option("-L", "--linkerd-namespace", "--controller-namespace", "controller_namespace", type=DNS_LABEL,
              default="linkerd", show_default=True, envvar="TETHER_CONTROLLER_NAMESPACE",
              help="with --platform kubernetes: the control plane's namespace")
@output_option(("table", "json", "yaml"))
def check(pre: bool, proxy: bool, categories: tuple[str, ...], namespace: str | None, state_dir: str,
          identity_issuer_dir: str | None, identity_trust_anchors_file: str | None,
          identity_issuer_certificate_file: str | None, timeout: float, platform: str, kubeconfig: str | None,
          kube_context: str | None, controller_namespace: str, output: str) -> int:
    """Check that the local control plane is running and its certificates are valid; with --proxy,
    that the proxies are ready and hold certificates from the trust anchors.

    \b
    Categories (default: linkerd-existence, linkerd-identity, control-plane-version; --proxy adds
    linkerd-data-plane, linkerd-identity-data-plane). On a local mesh (`tether up`) also
    tether-local (supervisor, control plane serving, state directory private) and, with --proxy,
    tether-local-data-plane (pods running, proxies ready and certified, clocks). --pre on the local
    platform checks nothing (it checks a Kubernetes cluster before install), so it fails and says so.

    \b
    With --platform kubernetes (and --kubeconfig/--context, as kubectl's), Linkerd's categories
    against the cluster: kubernetes-api and kubernetes-version always; with --pre,
    pre-kubernetes-setup (the control-plane namespace is free, permissions by
    SelfSubjectAccessReview, clock skew); otherwise linkerd-existence, linkerd-config,
    linkerd-identity (issuer Secret and trust-roots ConfigMap), linkerd-webhooks-and-apisvc-tls,
    linkerd-control-plane-proxy, control-plane-tls (plaintext served only while proxies of a release
    before control-plane TLS need it), linkerd-ha-checks, and with --proxy [-n NS]
    linkerd-data-plane and linkerd-identity-data-plane.

    The exit status is 1 when a check fails (warnings do not count). -o json prints Linkerd's shape:
    {"success": bool, "categories": [{"categoryName", "checks": [{"description", "hint", "result",
    "error"}]}]}.
    """
    kube = platform == "kubernetes"
    chosen = _categories(pre, proxy, categories, local=not kube and (Path(state_dir) / "mesh.json").exists(),
                         kube=kube)
    if not chosen:
        raise OperationFailed(
            "--pre: the local platform has no pre-installation checks: Linkerd's (" + ", ".join(PRE_KUBERNETES)
            + ") check a Kubernetes cluster before `install`: run `tether check --pre --platform kubernetes`; "
            "nothing was checked"
        )
    opts = CheckOptions(state_dir, identity_issuer_dir, identity_trust_anchors_file,
                        identity_issuer_certificate_file, namespace, timeout, platform, kubeconfig, kube_context,
                        controller_namespace)
    ctx = CheckContext(opts, dt.datetime.now(dt.UTC))
    try:
        if output == "table":
            _, ok = run_checks(chosen, ctx, sys.stdout)
        else:
            outcomes, ok = run_checks(chosen, ctx)
            dump(json_result(chosen, outcomes, ok), output)
    finally:
        if (kube_client := ctx.cache.get("kube")) is not None:
            kube_client.close()
    return 0 if ok else 1
