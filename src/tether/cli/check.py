"""`tether check`: health checks as data.

A check run is a list of categories (Linkerd's names, e.g. ``linkerd-identity``); each category is a
list of checkers with a description, a hint, and whether a failure is fatal (stop the run) or only a
warning. A checker is a function that returns normally on success or raises CheckFailed. Other
modules add categories with ``register_category`` (and their flags with ``add_arguments``).

Exit status: 0 when no check failed with an error (warnings allowed), 1 otherwise, so that an
expired certificate fails a CI job or a cron alert instead of printing a warning nobody reads.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

HINT_BASE = "https://linkerd.io/2/checks/#"
# Linkerd's marks; spelled as escapes so no reader mistakes them for letters.
MARK_OK, MARK_WARN, MARK_ERR = "\u221a", "\u203c", "\u00d7"
EXPIRY_WARNING = dt.timedelta(days=60)


class CheckFailed(Exception):
    """A checker's verdict: the message says what is wrong, in one or a few lines."""


@dataclass
class CheckContext:
    """What checkers see: the parsed flags, the time, and a cache checkers share within a run."""

    args: argparse.Namespace
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
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    # Whether the category runs for these flags (e.g. only with --proxy).
    enabled: Callable[[argparse.Namespace], bool] = lambda _args: True


CATEGORIES: list[Category] = []


def register_category(category: Category) -> None:
    if any(c.name == category.name for c in CATEGORIES):
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
    """Run each enabled category in order; returns the outcomes and whether the run succeeded."""
    outcomes: list[Outcome] = []
    ok = True
    for cat in categories:
        if not cat.enabled(ctx.args):
            continue
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


def _print(out: TextIO, o: Outcome) -> None:
    mark = {"ok": MARK_OK, "warning": MARK_WARN, "error": MARK_ERR}[o.status]
    out.write(f"{mark} {o.checker.description}\n")
    if o.error is not None:
        for line in o.error.splitlines():
            out.write(f"    {line}\n")
        if o.checker.hint:
            hint = o.checker.hint
            if "/" not in hint and " " not in hint:
                hint = HINT_BASE + hint
            out.write(f"    see {hint} for hints\n")


# -- linkerd-identity ------------------------------------------------------------------------------


def _identity_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("linkerd-identity")
    g.add_argument("--identity-trust-anchors-file", help="PEM bundle of trust anchors")
    g.add_argument("--identity-issuer-certificate-file", help="PEM issuer certificate")
    g.add_argument(
        "--identity-issuer-dir",
        help="issuer directory (tls.crt + ca.crt, or crt.pem); default <state-dir>/identity if it exists",
    )


def _load_identity(ctx: CheckContext) -> None:
    from tether.core.identity.certs import CertificateError, TrustBundle, parse_certificates

    a = ctx.args
    anchors_file, issuer_file = a.identity_trust_anchors_file, a.identity_issuer_certificate_file
    default_dir = Path(a.state_dir) / "identity"
    d = a.identity_issuer_dir or (str(default_dir) if default_dir.is_dir() else None)
    if d:
        dp = Path(d)
        issuer_file = issuer_file or str(dp / "tls.crt" if (dp / "tls.crt").exists() else dp / "crt.pem")
        anchors_file = anchors_file or str(dp / "ca.crt")
    if not anchors_file or not issuer_file:
        raise CheckFailed(
            "no identity certificates to check: pass --identity-issuer-dir DIR, or "
            "--identity-trust-anchors-file and --identity-issuer-certificate-file"
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
    ),
    add_arguments=_identity_args,
)

register_category(IDENTITY)


# -- the command -----------------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("check", help="check the installation", description=__doc__)
    p.add_argument("--pre", action="store_true", help="pre-installation checks only")
    p.add_argument("--proxy", action="store_true", help="also check the data plane")
    p.add_argument("--category", action="append", help="run only these categories (repeatable)")
    p.add_argument("--state-dir", default=".tether", help="local state directory")
    for cat in CATEGORIES:
        if cat.add_arguments:
            cat.add_arguments(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    cats = [c for c in CATEGORIES if not args.category or c.name in args.category]
    ctx = CheckContext(args, dt.datetime.now(dt.UTC))
    _, ok = run_checks(cats, ctx, sys.stdout)
    return 0 if ok else 1
