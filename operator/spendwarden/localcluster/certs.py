"""Certificates and keys for the local control plane, made with `cryptography`.

Not kopf's generator: it goes through oscrypto, which cannot find libcrypto on OpenSSL 3.
ECDSA P-256 as in envtest's TinyCA: generating a key takes microseconds (RSA 2048 takes ~100 ms each),
and kube-apiserver/kube-controller-manager accept EC keys for serving, client auth and
service-account tokens (ES256).
"""
from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Long enough for a demo cluster left running for days; envtest uses 168 h.
VALIDITY = datetime.timedelta(days=30)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


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

    def __init__(self, cn: str) -> None:
        self.key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        name = _name(cn)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate small clock skew
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    @property
    def pair(self) -> KeyPair:
        return KeyPair(self.cert, self.key)

    def _issue(self, subject: x509.Name, usage: list[x509.ObjectIdentifier],
               san: list[x509.GeneralName] | None = None) -> KeyPair:
        key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
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

    def serving(self, hosts: list[str]) -> KeyPair:
        """A TLS server certificate for DNS names and IP addresses (CN = the first host)."""
        san: list[x509.GeneralName] = []
        for h in hosts:
            try:
                san.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                san.append(x509.DNSName(h))
        return self._issue(_name(hosts[0]), [ExtendedKeyUsageOID.SERVER_AUTH], san)

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
