"""Certificates for the local control plane: the production helpers in spendwarden.tls (also used
for the admission webhook), re-exported under their historical names."""
from __future__ import annotations

from ..tls import CA, VALIDITY, KeyPair, cert_pem, key_pem, write_signing_key

__all__ = ["CA", "VALIDITY", "KeyPair", "cert_pem", "key_pem", "write_signing_key"]
