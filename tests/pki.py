"""Test certificates made here (cryptography): keys, CA / server / client certificates, and a self-signed
server certificate written to files."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Dict, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def new_key():
    return ec.generate_private_key(ec.SECP256R1())


def pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_cert(subject: str, key, issuer=None, issuer_key=None, *, ca=False, san=None, client=False):
    """A certificate for ``key`` named ``subject``, signed by ``issuer``/``issuer_key`` (None: self-signed):
    a CA (``ca``), else a server or (``client``) a client certificate; ``san``: subject alternative names."""
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer is not None else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False), critical=True)
    else:
        usage = x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH if client else x509.oid.ExtendedKeyUsageOID.SERVER_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    cert = builder.sign(issuer_key if issuer_key is not None else key, hashes.SHA256())
    return cert


def pem_cert(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def self_signed_tls(directory: Path, dns_names: Sequence[str] = (), ips: Sequence[str] = (),
                    stem: str = "tls") -> Dict[str, Path]:
    """A self-signed server certificate (it is its own CA: clients trust ``crt``) for ``dns_names`` and ``ips``,
    written as ``<stem>.crt`` / ``<stem>.key`` in ``directory``; returns {"crt": path, "key": path}."""
    key = new_key()
    san = [x509.DNSName(n) for n in dns_names] + [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = make_cert((list(dns_names) + ["macefield"])[0], key, ca=True, san=san)
    paths = {"crt": directory / f"{stem}.crt", "key": directory / f"{stem}.key"}
    paths["crt"].write_bytes(pem_cert(cert))
    paths["key"].write_bytes(pem_key(key))
    return paths
