"""`inference-gateway certificates ca|issue`: a site CA for the on-demand data plane, and the pilot,
gateway and metrics certificates it signs (docs/on-demand.md, "Certificates").

    inference-gateway certificates ca --dir /etc/inference-gateway/ca [--days 3650] [--organization ORG]
    inference-gateway certificates issue --ca-dir /etc/inference-gateway/ca --role gateway \\
        --name gateway --out-dir /etc/inference-gateway/tls [--days 365]

`ca` writes `ca.pem` and `ca.key`; `issue` writes `{name}.pem` and `{name}.key`. Existing files are
never overwritten; keys are created readable by their owner only. Each command prints the subject
(the pilots' `gateway_subjects` and `metrics_subjects` name the gateway's and the scraper's) and the
expiry. A pilot's certificate must outlive the walltime of every job that uses it.
"""

from __future__ import annotations

import argparse
import datetime
import re
import sys
from pathlib import Path

from cryptography import x509

from mtls.certificates import Issued, Role, create_ca, issue, subject_of, write
from proxy.process.command_line import Subparsers

CA_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

_ROLES = {
    Role.pilot: "serves model servers on a compute node (serverAuth; names no host)",
    Role.gateway: "calls pilots for inference (clientAuth)",
    Role.metrics: "scrapes pilots' /metrics (clientAuth)",
}


class CertificateError(Exception):
    """Printed as one line; exit status 1."""


def _name(text: str) -> str:
    if not _FILE_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r}: letters, digits, '.', '_' and '-' only (it also names the files)"
        )
    return text


def _days(text: str) -> float:
    days = float(text)
    if not 0 < days <= 36500:
        raise argparse.ArgumentTypeError(f"{text}: between 0 and 36500 days")
    return days


def add_parser(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "certificates",
        help="create a site CA and the pilot, gateway and metrics certificates it signs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="action", required=True, title="actions")
    ca = actions.add_parser("ca", help="create a site CA", description="Create a site CA: ca.pem and ca.key.")
    ca.add_argument(
        "--dir", type=Path, required=True, help="folder for ca.pem and ca.key (created if absent)"
    )
    ca.add_argument("--days", type=_days, default=3650, help="validity (default: 3650)")
    ca.add_argument("--organization", default="inference-gateway", help="O= of the CA and what it issues")
    ca.add_argument("--name", type=str, default="Inference Gateway Site CA", help="the CA's CN")
    ca.set_defaults(run=run_ca)
    summary = "issue a pilot, gateway or metrics certificate signed by the site CA"
    issued = actions.add_parser("issue", help=summary, description=summary)
    issued.add_argument("--ca-dir", type=Path, required=True, help="the folder `certificates ca` wrote")
    issued.add_argument(
        "--role",
        required=True,
        choices=[role.value for role in Role],
        help="; ".join(f"{role.value}: {what}" for role, what in _ROLES.items()),
    )
    issued.add_argument(
        "--name", type=_name, required=True, help="the CN; also names {name}.pem and {name}.key"
    )
    issued.add_argument(
        "--out-dir", type=Path, required=True, help="folder for the two files (created if absent)"
    )
    issued.add_argument("--days", type=_days, default=365, help="validity (default: 365)")
    issued.add_argument("--organization", help="O= (default: the CA's)")
    issued.set_defaults(run=run_issue)


def run_ca(args: argparse.Namespace) -> int:
    files = (args.dir / CA_FILE, args.dir / CA_KEY_FILE)
    try:
        _refuse_existing(*files)
        ca = create_ca(args.name, args.organization, days=args.days)
        _write(ca, *files)
    except CertificateError as exc:
        print(f"inference-gateway certificates ca: {exc}", file=sys.stderr)
        return 1
    _describe(ca, files[0], "the CA file: the pilots' `ca` and the gateway's client CA")
    return 0


def run_issue(args: argparse.Namespace) -> int:
    files = (args.out_dir / f"{args.name}.pem", args.out_dir / f"{args.name}.key")
    try:
        _refuse_existing(*files)
        ca = _load_ca(args.ca_dir)
        ca_end = x509.load_pem_x509_certificate(ca.certificate).not_valid_after_utc
        end = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=args.days)
        if end > ca_end:
            raise CertificateError(
                f"the CA expires at {ca_end.isoformat()}, before this certificate would ({end.isoformat()}): "
                "fewer --days, or a new CA"
            )
        role = Role(args.role)
        try:
            issued = issue(ca, role, args.name, days=args.days, organization=args.organization)
        except (ValueError, TypeError) as exc:  # a key this tool did not make, or one with a passphrase
            raise CertificateError(f"{args.ca_dir / CA_KEY_FILE}: cannot sign with it: {exc}") from None
        _write(issued, *files)
    except CertificateError as exc:
        print(f"inference-gateway certificates issue: {exc}", file=sys.stderr)
        return 1
    _describe(issued, files[0], f"a {role.value} certificate: {_ROLES[role]}")
    return 0


def _refuse_existing(*paths: Path) -> None:
    existing = [str(path) for path in paths if path.exists()]
    if existing:
        verb = "exists" if len(existing) == 1 else "exist"
        raise CertificateError(f"{' and '.join(existing)} already {verb}: nothing was overwritten")


def _load_ca(folder: Path) -> Issued:
    try:
        ca = Issued((folder / CA_FILE).read_bytes(), (folder / CA_KEY_FILE).read_bytes())
        x509.load_pem_x509_certificate(ca.certificate)
    except OSError as exc:
        raise CertificateError(f"cannot read the CA: {exc.filename}: {exc.strerror}") from None
    except ValueError as exc:
        raise CertificateError(f"{folder / CA_FILE}: not a PEM certificate: {exc}") from None
    return ca


def _write(issued: Issued, certificate: Path, key: Path) -> None:
    try:
        certificate.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write(issued, certificate, key)
    except OSError as exc:
        certificate.unlink(missing_ok=True)
        raise CertificateError(f"cannot write {exc.filename}: {exc.strerror}") from None


def _describe(issued: Issued, certificate: Path, what: str) -> None:
    end = x509.load_pem_x509_certificate(issued.certificate).not_valid_after_utc
    print(f"{certificate}: {what}")
    print(f"  subject: {subject_of(issued.certificate)}")
    print(f"  expires: {end.isoformat()}")
    print(f"  key:     {certificate.with_suffix('.key')} (mode 0600)")
