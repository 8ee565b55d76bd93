"""The mesh's local CA and the certificate of every identity (``recmesh certs``; ``recmesh up``
calls :func:`ensure` before it starts anything).

One directory (``var/tls`` by default) holds::

    ca.crt  ca.key            the CA (ECDSA P-256, 10 years), which signs the others
    <identity>.crt .key       one per identity of mesh.identity.IDENTITIES (ECDSA P-256,
                              90 days): SAN URI spiffe://recmesh/<identity>, DNS <identity>,
                              localhost, 127.0.0.1 and ::1; server and client use

:func:`ensure` keeps what is still good and issues what is not: a missing, unreadable or
expiring (within :data:`RENEW_BEFORE`) CA is replaced, and then every certificate with it;
a certificate that is missing, expiring, not signed by the current CA or naming another
identity is re-issued. Running processes read their files at start-up, so a re-issued
certificate is used from a process's next start (``docs/security.md``, "Rotation").
Keys are written ``0600`` in a ``0700`` directory; concurrent callers are serialised by a
lock file, and each file is replaced atomically.

``python -m ops.certs [--dir DIR] [--force] [IDENTITY ...]``
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import ipaddress
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh.identity import IDENTITIES
from mesh.paths import VAR_DIR
from mesh.tls import CA_FILE, cert_file, key_file, spiffe_id

CA_KEY_FILE = "ca.key"
CA_VALID = datetime.timedelta(days=3650)
CERT_VALID = datetime.timedelta(days=90)
RENEW_BEFORE = datetime.timedelta(days=14)
"""A certificate expiring sooner than this is issued again."""

DEFAULT_DIR = VAR_DIR / "tls"

Clock = Callable[[], datetime.datetime]


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass(frozen=True)
class Issued:
    """What :func:`ensure` did: the identities it (re)issued, and whether the CA is new."""

    new_ca: bool
    issued: tuple[str, ...]


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data`` atomically, created with ``mode``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, path)


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    with open(directory / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _fresh(cert: x509.Certificate, now: datetime.datetime) -> bool:
    return cert.not_valid_before_utc <= now and cert.not_valid_after_utc - RENEW_BEFORE > now


def _load_ca(
    directory: Path, now: datetime.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """The CA in ``directory`` when both files load, match and it is fresh; else None."""
    try:
        cert = x509.load_pem_x509_certificate((directory / CA_FILE).read_bytes())
        key = serialization.load_pem_private_key(
            (directory / CA_KEY_FILE).read_bytes(), password=None
        )
    except (OSError, ValueError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        return None
    return (cert, key) if _fresh(cert, now) else None


def _new_ca(now: datetime.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "recmesh"),
            x509.NameAttribute(NameOID.COMMON_NAME, "recmesh local CA"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + CA_VALID)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _identity_of(cert: x509.Certificate) -> str | None:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if len(uris) == 1 else None


def _good_leaf(
    directory: Path, identity: str, ca: x509.Certificate, now: datetime.datetime
) -> bool:
    """Whether ``identity``'s certificate and key are there, match, name it, are signed by
    ``ca`` and stay valid past the renewal window."""
    try:
        cert = x509.load_pem_x509_certificate(cert_file(directory, identity).read_bytes())
        key = serialization.load_pem_private_key(
            key_file(directory, identity).read_bytes(), password=None
        )
        cert.verify_directly_issued_by(ca)
    except (OSError, ValueError, TypeError, InvalidSignature):
        return False
    return (
        isinstance(key, ec.EllipticCurvePrivateKey)
        and key.public_key() == cert.public_key()
        and _identity_of(cert) == spiffe_id(identity)
        and _fresh(cert, now)
    )


def issue(
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    identity: str | None,
    now: datetime.datetime,
    *,
    common_name: str = "",
    valid: datetime.timedelta = CERT_VALID,
) -> tuple[bytes, bytes]:
    """A certificate of ``identity`` signed by ``ca`` and its key, both PEM.

    ``identity`` None issues a certificate the CA signed that names no identity (tests use
    it for a caller the CA vouches for but the mesh cannot name).
    """
    key = _key()
    names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    if identity is not None:
        names = [
            x509.UniformResourceIdentifier(spiffe_id(identity)),
            x509.DNSName(identity),
            *names,
        ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name or identity or "-")])
        )
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + valid, ca.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def ensure(
    directory: Path = DEFAULT_DIR,
    identities: Sequence[str] = IDENTITIES,
    *,
    force: bool = False,
    clock: Clock = _utcnow,
) -> Issued:
    """Make ``directory`` hold a fresh CA and a fresh certificate for each of ``identities``,
    keeping whatever is still good (``force``: issue everything anew, the CA included)."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    now = clock()
    with _locked(directory):
        found = None if force else _load_ca(directory, now)
        new_ca = found is None
        if found is None:
            found = _new_ca(now)
            ca, ca_key = found
            _write(directory / CA_KEY_FILE, _pem_key(ca_key), 0o600)
            _write(directory / CA_FILE, ca.public_bytes(serialization.Encoding.PEM), 0o644)
        ca, ca_key = found
        issued = []
        for identity in identities:
            if not new_ca and _good_leaf(directory, identity, ca, now):
                continue
            cert, key = issue(ca, ca_key, identity, now)
            _write(key_file(directory, identity), key, 0o600)
            _write(cert_file(directory, identity), cert, 0o644)
            issued.append(identity)
    return Issued(new_ca, tuple(issued))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ops.certs",
        description="Issue the mesh's CA and identity certificates (keeping the good ones).",
    )
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="default: %(default)s")
    parser.add_argument("--force", action="store_true", help="issue everything anew, CA too")
    parser.add_argument(
        "identities", nargs="*", default=list(IDENTITIES), help="default: every identity"
    )
    args = parser.parse_args(argv)
    result = ensure(args.dir, args.identities, force=args.force)
    kept = [i for i in args.identities if i not in result.issued]
    print(f"{args.dir}: CA {'issued' if result.new_ca else 'kept'}", file=sys.stderr)
    print(f"  issued: {' '.join(result.issued) or '-'}", file=sys.stderr)
    print(f"  kept:   {' '.join(kept) or '-'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
