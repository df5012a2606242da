"""Certificates and keys made with `cryptography`: the local control plane's CAs and the admission
webhook's CA and serving certificate.

Not kopf's generator: it goes through oscrypto, which cannot find libcrypto on OpenSSL 3.
ECDSA P-256 as in envtest's TinyCA: generating a key takes microseconds (RSA 2048 takes ~100 ms each),
and kube-apiserver/kube-controller-manager accept EC keys for serving, client auth and
service-account tokens (ES256).
"""
from __future__ import annotations

import base64
import datetime
import ipaddress
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Long enough for a demo cluster left running for days; envtest uses 168 h.
VALIDITY = datetime.timedelta(days=30)

# The webhook's CA lives long so that rotating the serving certificate never changes the caBundle
# the apiserver holds (a CA change has a window where the apiserver trusts only the old one).
WEBHOOK_CA_VALIDITY = datetime.timedelta(days=3650)
WEBHOOK_CERT_VALIDITY = datetime.timedelta(days=365)
ROTATE_BEFORE = datetime.timedelta(days=30)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(cn: str, orgs: list[str] | tuple[str, ...] = ()) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
                     + [x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass
class KeyPair:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return cert_pem(self.cert)

    @property
    def key_pem(self) -> bytes:
        return key_pem(self.key)

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        """Write <stem>.crt and <stem>.key (the key readable by the owner only)."""
        crt, key = directory / f"{stem}.crt", directory / f"{stem}.key"
        crt.write_bytes(self.cert_pem)
        _write_private(key, self.key_pem)
        return crt, key


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


class CA:
    """A tiny certificate authority that signs serving and client certificates."""

    def __init__(self, cn: str, validity: datetime.timedelta = VALIDITY, *,
                 _loaded: KeyPair | None = None) -> None:
        if _loaded is not None:
            self.cert, self.key = _loaded.cert, _loaded.key
            return
        self.key = _key()
        now = _now()
        name = _name(cn)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate small clock skew
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    @classmethod
    def load(cls, cert: bytes, key: bytes) -> CA:
        """A CA from PEM certificate and key (e.g. kept in a Secret)."""
        private = serialization.load_pem_private_key(key, password=None)
        if not isinstance(private, ec.EllipticCurvePrivateKey):
            raise ValueError("the CA key is not an EC key")
        return cls("", _loaded=KeyPair(x509.load_pem_x509_certificate(cert), private))

    @property
    def pair(self) -> KeyPair:
        return KeyPair(self.cert, self.key)

    def _issue(self, subject: x509.Name, usage: list[x509.ObjectIdentifier],
               san: list[x509.GeneralName] | None = None,
               validity: datetime.timedelta = VALIDITY) -> KeyPair:
        key = _key()
        now = _now()
        # A certificate must not outlive its issuer: clients would reject it after the CA expires.
        not_after = min(now + validity, self.cert.not_valid_after_utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True, key_cert_sign=False,
                                         crl_sign=False, content_commitment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                           critical=False)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return KeyPair(builder.sign(self.key, hashes.SHA256()), key)

    def serving(self, hosts: list[str], validity: datetime.timedelta = VALIDITY) -> KeyPair:
        """A TLS server certificate for DNS names and IP addresses (CN = the first host)."""
        san: list[x509.GeneralName] = []
        for h in hosts:
            try:
                san.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                san.append(x509.DNSName(h))
        return self._issue(_name(hosts[0]), [ExtendedKeyUsageOID.SERVER_AUTH], san, validity)

    def client(self, user: str, groups: list[str] | tuple[str, ...] = ()) -> KeyPair:
        """A client certificate: kube-apiserver reads the user from CN and the groups from O."""
        return self._issue(_name(user, groups), [ExtendedKeyUsageOID.CLIENT_AUTH])


def write_signing_key(directory: Path, stem: str = "sa") -> tuple[Path, Path]:
    """The service-account token signing key pair: <stem>.key (private) and <stem>.pub."""
    key = _key()
    priv, pub = directory / f"{stem}.key", directory / f"{stem}.pub"
    _write_private(priv, key_pem(key))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


# -- the admission webhook's certificates ---------------------------------------------------------

SECRET_KEYS = ("ca.crt", "ca.key", "tls.crt", "tls.key")


@dataclass(frozen=True)
class WebhookTLS:
    """The webhook's CA and serving certificate, as PEM (the form a kubernetes.io/tls Secret keeps)."""
    ca_cert: bytes
    ca_key: bytes
    cert: bytes
    key: bytes

    def secret_data(self) -> dict[str, str]:
        values = (self.ca_cert, self.ca_key, self.cert, self.key)
        return {k: base64.b64encode(v).decode("ascii") for k, v in zip(SECRET_KEYS, values)}

    @classmethod
    def from_secret_data(cls, data: Mapping[str, str] | None) -> WebhookTLS | None:
        """None when a key is missing or undecodable: the caller then issues new certificates."""
        try:
            raw = [base64.b64decode((data or {})[k]) for k in SECRET_KEYS]
        except (KeyError, ValueError):
            return None
        return cls(*raw) if all(raw) else None

    def write(self, directory: Path) -> tuple[Path, Path]:
        """Write <dir>/tls.pem (certificate + key in one file) and <dir>/ca.crt; returns both paths.

        One file for certificate and key, replaced atomically: kopf's WebhookServer polls its files
        and reloads on change, and must never load a new certificate with an old key."""
        pem, ca = directory / "tls.pem", directory / "ca.crt"
        _replace(ca, self.ca_cert, private=False)
        _replace(pem, self.cert + self.key, private=True)
        return pem, ca


def _replace(path: Path, data: bytes, private: bool) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if not private:
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; the CA certificate is public
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _sans(cert: x509.Certificate) -> set[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(v) for v in ext.get_values_for_type(x509.DNSName)} | \
           {str(v) for v in ext.get_values_for_type(x509.IPAddress)}


def webhook_tls_problem(tls: WebhookTLS | None, hosts: Iterable[str], now: datetime.datetime | None = None,
                        rotate_before: datetime.timedelta = ROTATE_BEFORE) -> str | None:
    """Why the stored certificates cannot be reused (None: reuse them)."""
    if tls is None:
        return "absent"
    now = now or _now()
    try:
        ca = x509.load_pem_x509_certificate(tls.ca_cert)
        cert = x509.load_pem_x509_certificate(tls.cert)
        cert.verify_directly_issued_by(ca)  # a Secret edited by hand may pair a cert with another CA
        serialization.load_pem_private_key(tls.key, password=None)
        serialization.load_pem_private_key(tls.ca_key, password=None)
    except Exception as exc:  # noqa: BLE001 - any unreadable or mismatched material is replaced
        return f"unusable ({type(exc).__name__})"
    if cert.not_valid_after_utc - now < rotate_before:
        return f"expires {cert.not_valid_after_utc:%Y-%m-%d}"
    missing = set(hosts) - _sans(cert)
    if missing:
        return f"does not name {', '.join(sorted(missing))}"
    return None


def issue_webhook_tls(hosts: list[str], previous: WebhookTLS | None = None, now: datetime.datetime | None = None,
                      rotate_before: datetime.timedelta = ROTATE_BEFORE,
                      cert_validity: datetime.timedelta = WEBHOOK_CERT_VALIDITY) -> WebhookTLS:
    """A new serving certificate for `hosts`, signed by the previous CA while that CA has more than
    `rotate_before` left (so the caBundle stays the same), else by a new CA."""
    now = now or _now()
    ca: CA | None = None
    if previous is not None:
        try:
            ca = CA.load(previous.ca_cert, previous.ca_key)
            if ca.cert.not_valid_after_utc - now < rotate_before:
                ca = None
        except Exception:  # noqa: BLE001 - an unreadable CA is replaced
            ca = None
    if ca is None:
        ca = CA("spendwarden-webhook-ca", WEBHOOK_CA_VALIDITY)
    pair = ca.serving(hosts, cert_validity)
    return WebhookTLS(ca_cert=cert_pem(ca.cert), ca_key=key_pem(ca.key), cert=pair.cert_pem, key=pair.key_pem)


def not_after(pem: bytes) -> datetime.datetime:
    return x509.load_pem_x509_certificate(pem).not_valid_after_utc
