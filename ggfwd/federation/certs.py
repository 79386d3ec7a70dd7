"""`ggfwd certs`: a private CA and a server certificate for a federation on a LAN, and node key pairs for node
authentication, with the `cryptography` package (a dependency of Flower).

- `ca.pem` / `ca.key`: a self-signed CA (P-384). Nodes get `ca.pem`; keep `ca.key` private.
- `server.pem` / `server.key`: the SuperLink's certificate, signed by the CA, valid for localhost, 127.0.0.1
  and every `--host` name or address.
- `node-I.key` / `node-I.pub`: a node's P-384 key pair in OpenSSH format, as Flower's SuperNode authentication
  reads them (`ggfwd join --key node-I.key`; the server registers the .pub files with `ggfwd serve --node-keys`).

Every file is written atomically; private keys are readable by their owner only.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from ..errors import UserError
from ..files import atomic_path


def make_certs(folder: Path, hosts: list[str], nodes: int = 0, days: int = 365) -> list[Path]:
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        raise UserError("ggfwd certs needs the cryptography package: pip install 'ggfwd[federated]'") from None
    names = []
    for host in ["localhost", "127.0.0.1", *hosts]:
        host = host.strip()
        if not host or len(host) > 253 or any(c.isspace() for c in host):
            raise UserError(f"--host takes a host name or an IP address, got '{host}'")
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    names = list(dict.fromkeys(names))
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} exists and is not a folder")
    if (folder / "ca.pem").exists():
        raise UserError(f"{folder} already holds a CA (ca.pem): choose another folder")
    now = datetime.datetime.now(datetime.timezone.utc)
    until = now + datetime.timedelta(days=days)

    def pem_key(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ggfwd federation CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(until)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    server_key = ec.generate_private_key(ec.SECP384R1())
    common_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(hosts[0] if hosts else "localhost"))])
    server = (x509.CertificateBuilder().subject_name(common_name)
              .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now).not_valid_after(until)
              .add_extension(x509.SubjectAlternativeName(names), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .sign(ca_key, hashes.SHA256()))
    files = {"ca.pem": (ca.public_bytes(serialization.Encoding.PEM), False), "ca.key": (pem_key(ca_key), True),
             "server.pem": (server.public_bytes(serialization.Encoding.PEM), False),
             "server.key": (pem_key(server_key), True)}
    for i in range(nodes):
        key = ec.generate_private_key(ec.SECP384R1())
        files[f"node-{i}.key"] = (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                     serialization.NoEncryption()), True)
        files[f"node-{i}.pub"] = (key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                serialization.PublicFormat.OpenSSH), False)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (data, private) in files.items():
        path = folder / name
        with atomic_path(path) as tmp:
            if private:
                os.chmod(tmp, 0o600)  # before the key is written
            tmp.write_bytes(data)
        written.append(path)
    return written
