"""Certificates for TLS tests, made with the ``cryptography`` package: one
CA, server certificates for 127.0.0.1/localhost, client certificates.
Files are PEM, written into a directory the caller owns (a tmp dir)."""
from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class KeyPair:
    """A certificate and its key on disk."""
    cert_file: str
    key_file: str


class CertificateAuthority:
    """A throwaway CA under ``directory``: ``ca_file`` is its certificate;
    ``server()`` and ``client()`` issue leaf certificates signed by it."""

    def __init__(self, directory: str | Path, name: str = "registrar test CA"):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self._cert = (x509.CertificateBuilder()
                      .subject_name(subject).issuer_name(subject)
                      .public_key(self._key.public_key())
                      .serial_number(x509.random_serial_number())
                      .not_valid_before(now - datetime.timedelta(minutes=5))
                      .not_valid_after(now + datetime.timedelta(days=2))
                      .add_extension(x509.BasicConstraints(ca=True, path_length=None),
                                     critical=True)
                      .add_extension(x509.KeyUsage(
                          digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, encipher_only=False,
                          decipher_only=False), critical=True)
                      .sign(self._key, hashes.SHA256()))
        self.ca_file = str(self.directory / "ca.pem")
        Path(self.ca_file).write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def server(self, name: str = "server", hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
               client_auth: bool = True, expired: bool = False) -> KeyPair:
        """A server certificate valid for ``hosts`` (IPs and DNS names). With
        ``client_auth`` it may also act as a client (etcd peers, ZooKeeper
        quorum TLS use the same certificate both ways). ``expired``: its
        validity ended an hour ago."""
        usages = [ExtendedKeyUsageOID.SERVER_AUTH]
        if client_auth:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        return self._issue(name, hosts, usages, expired=expired)

    def client(self, name: str = "client", common_name: bool = True) -> KeyPair:
        """A client certificate with common name ``name`` (etcd maps the CN
        to a user when client-certificate auth is on). ``common_name=False``:
        the subject is O=``name`` with no CN (etcd's JSON gateway refuses a
        client certificate with a CN once auth is enabled)."""
        return self._issue(name, (), [ExtendedKeyUsageOID.CLIENT_AUTH], common_name)

    def _issue(self, name: str, hosts: tuple[str, ...], usages: list,
               common_name: bool = True, expired: bool = False) -> KeyPair:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        oid = NameOID.COMMON_NAME if common_name else NameOID.ORGANIZATION_NAME
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(oid, name)]))
                   .issuer_name(self._cert.subject)
                   .public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=2 if expired else 0, minutes=5))
                   .not_valid_after(now + (datetime.timedelta(hours=-1) if expired
                                           else datetime.timedelta(days=1)))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
        if hosts:
            names: list[x509.GeneralName] = []
            for host in hosts:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    names.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        cert_file, key_file = self.directory / f"{name}.pem", self.directory / f"{name}-key.pem"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key_file.chmod(0o600)
        return KeyPair(str(cert_file), str(key_file))

    def keystore(self, pair: KeyPair, path: str | Path, password: str = "changeit") -> str:
        """``pair`` as a PKCS#12 file (for Java servers such as ZooKeeper)."""
        from cryptography.hazmat.primitives.serialization import pkcs12

        cert = x509.load_pem_x509_certificate(Path(pair.cert_file).read_bytes())
        key = serialization.load_pem_private_key(Path(pair.key_file).read_bytes(), None)
        data = pkcs12.serialize_key_and_certificates(
            b"key", key, cert, [self._cert],
            serialization.BestAvailableEncryption(password.encode()))
        Path(path).write_bytes(data)
        return str(path)

    def truststore(self, path: str | Path, password: str = "changeit") -> str:
        """The CA certificate alone as a PKCS#12 trust store (Java)."""
        from cryptography.hazmat.primitives.serialization import pkcs12

        data = pkcs12.serialize_java_truststore(
            [pkcs12.PKCS12Certificate(self._cert, b"ca")],
            serialization.BestAvailableEncryption(password.encode()))
        Path(path).write_bytes(data)
        return str(path)
