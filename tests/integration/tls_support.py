"""Throwaway certificates for the TLS tests: two CAs, a server certificate and client certificates.

Made with the ``cryptography`` package when it is installed, else with the ``openssl`` command
(Debian has it); either way EC P-256 keys, valid for a day, written as PEM files into a directory.
Nothing here is secret: the keys live as long as the test session's temporary directory.
"""

from __future__ import annotations

import datetime
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

SERVER_NAMES = ("localhost",)
SERVER_IPS = ("127.0.0.1",)
CLIENT_NAME = "alice"  # the commonName of the good client certificate
OTHER_CLIENT_NAME = "mallory"  # signed by the other CA


@dataclass(frozen=True)
class Pki:
    """Where each PEM file is. ``ca`` signed ``server_*`` and ``client_*``; ``other_ca`` signed
    only ``other_client_*`` (and trusts nothing of the rest)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_client_cert: Path
    other_client_key: Path


def make_pki(directory: Path) -> Pki:
    """Write a fresh set of certificates into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        import cryptography  # noqa: F401
    except ImportError:
        if shutil.which("openssl") is None:
            raise RuntimeError(
                "the TLS tests need the cryptography package or the openssl command"
            ) from None
        return _with_openssl(directory)
    return _with_cryptography(directory)


def _paths(directory: Path) -> Pki:
    return Pki(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server-key.pem",
        client_cert=directory / "client.pem",
        client_key=directory / "client-key.pem",
        other_ca=directory / "other-ca.pem",
        other_client_cert=directory / "other-client.pem",
        other_client_key=directory / "other-client-key.pem",
    )


# -- with cryptography ----------------------------------------------------------------------------
def _with_cryptography(directory: Path) -> Pki:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    pki = _paths(directory)

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    def issue(
        subject: str,
        key: ec.EllipticCurvePrivateKey,
        issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
        extensions: list[tuple[x509.ExtensionType, bool]],
    ) -> x509.Certificate:
        issuer_name, issuer_key = issuer if issuer is not None else (name(subject), key)
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical)
        return builder.sign(issuer_key, hashes.SHA256())

    def write_cert(cert: x509.Certificate, path: Path) -> None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def make_ca(common_name: str, path: Path) -> tuple[x509.Name, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = issue(
            common_name,
            key,
            None,
            [
                (x509.BasicConstraints(ca=True, path_length=None), True),
                (
                    x509.KeyUsage(
                        digital_signature=True,
                        content_commitment=False,
                        key_encipherment=False,
                        data_encipherment=False,
                        key_agreement=False,
                        key_cert_sign=True,
                        crl_sign=True,
                        encipher_only=False,
                        decipher_only=False,
                    ),
                    True,
                ),
                (x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False),
            ],
        )
        write_cert(cert, path)
        return cert.subject, key

    def make_leaf(
        common_name: str,
        ca: tuple[x509.Name, ec.EllipticCurvePrivateKey],
        usage: x509.ObjectIdentifier,
        cert_path: Path,
        key_path: Path,
        names: list[x509.GeneralName] | None = None,
    ) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        extensions: list[tuple[x509.ExtensionType, bool]] = [
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (x509.ExtendedKeyUsage([usage]), False),
            (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca[1].public_key()), False),
        ]
        if names:
            extensions.append((x509.SubjectAlternativeName(names), False))
        write_cert(issue(common_name, key, ca, extensions), cert_path)
        write_key(key, key_path)

    ca = make_ca("bitfusion-net test CA", pki.ca)
    other_ca = make_ca("another test CA", pki.other_ca)
    server_names: list[x509.GeneralName] = [x509.DNSName(n) for n in SERVER_NAMES]
    server_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in SERVER_IPS]
    make_leaf(
        "localhost",
        ca,
        ExtendedKeyUsageOID.SERVER_AUTH,
        pki.server_cert,
        pki.server_key,
        server_names,
    )
    make_leaf(CLIENT_NAME, ca, ExtendedKeyUsageOID.CLIENT_AUTH, pki.client_cert, pki.client_key)
    make_leaf(
        OTHER_CLIENT_NAME,
        other_ca,
        ExtendedKeyUsageOID.CLIENT_AUTH,
        pki.other_client_cert,
        pki.other_client_key,
    )
    return pki


# -- with the openssl command ---------------------------------------------------------------------
def _with_openssl(directory: Path) -> Pki:
    pki = _paths(directory)

    def openssl(*args: str | Path) -> None:
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)

    def make_ca(common_name: str, cert: Path) -> Path:
        key = cert.with_suffix(".key")
        openssl(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", key, "-out", cert, "-days", "1", "-subj", f"/CN={common_name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        )  # fmt: skip
        return key

    def make_leaf(
        common_name: str, ca: Path, ca_key: Path, cert: Path, key: Path, extensions: str
    ) -> None:
        request = cert.with_suffix(".csr")
        extfile = cert.with_suffix(".ext")
        extfile.write_text(extensions)
        openssl(
            "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", key, "-out", request, "-subj", f"/CN={common_name}",
        )  # fmt: skip
        openssl(
            "x509", "-req", "-in", request, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
            "-out", cert, "-days", "1", "-sha256", "-extfile", extfile,
        )  # fmt: skip

    ca_key = make_ca("bitfusion-net test CA", pki.ca)
    other_ca_key = make_ca("another test CA", pki.other_ca)
    alt_names = ",".join([f"DNS:{n}" for n in SERVER_NAMES] + [f"IP:{ip}" for ip in SERVER_IPS])
    make_leaf(
        "localhost",
        pki.ca,
        ca_key,
        pki.server_cert,
        pki.server_key,
        f"basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\nsubjectAltName={alt_names}\n",
    )
    client_extensions = "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n"
    make_leaf(CLIENT_NAME, pki.ca, ca_key, pki.client_cert, pki.client_key, client_extensions)
    make_leaf(
        OTHER_CLIENT_NAME,
        pki.other_ca,
        other_ca_key,
        pki.other_client_cert,
        pki.other_client_key,
        client_extensions,
    )
    return pki
