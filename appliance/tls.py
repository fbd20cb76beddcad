"""The site's own TLS certificate (tls.certificate/tls.key in the site file).

Checked when the site file loads, so a wrong file is refused before anything is built or
booted; read again each time credentials are made, so a renewed certificate reaches the
nodes at their next boot. The nodes that terminate TLS (the filters' SMTP, the mailstores'
submission and IMAP) receive it as the credentials mailcluster.tls-cert/-key; without it
each makes its own self-signed certificate at first boot (mailcluster-tls.service).
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import os
import re
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

# Larger than any real chain (a leaf and two intermediates are about 6 KiB); it travels
# as an SMBIOS credential.
MAX_PEM_BYTES = 32 * 1024
_PEM = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.S)
HINT = "tls.certificate: the PEM chain (the node's certificate first); tls.key: its unencrypted PEM private key"


@dataclass(frozen=True)
class SiteCertificate:
    chain: str  # PEM, the leaf first
    key: str  # PEM
    subject: str
    names: tuple[str, ...]  # the subjectAltName DNS names
    not_after: datetime.datetime
    public_key: str  # PEM, the leaf's (checked against the key at load)

    @property
    def leaf_der(self) -> bytes:
        return _blocks(self.chain, "CERTIFICATE")[0]

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the leaf certificate, as a client sees it (hex)."""
        return hashlib.sha256(self.leaf_der).hexdigest()

    @property
    def spki_sha256(self) -> str:
        """SHA-256 of the leaf's public key (SubjectPublicKeyInfo): a TLSA 3 1 1 record."""
        return hashlib.sha256(_blocks(self.public_key, "PUBLIC KEY")[0]).hexdigest()

    def covers(self, name: str) -> bool:
        name = name.rstrip(".").lower()
        for n in self.names:
            n = n.lower()
            if n == name or (n.startswith("*.") and "." in name and name.split(".", 1)[1] == n[2:]):
                return True
        return False

    def describe(self) -> str:
        return (f"the site's certificate for {', '.join(self.names) or self.subject}, valid until "
                f"{self.not_after:%Y-%m-%d}, SHA-256 {self.fingerprint[:16]}...")


def _blocks(text: str, kind: str) -> list[bytes]:
    return [base64.b64decode(body) for k, body in _PEM.findall(text) if k == kind]


def _openssl(args: list[str], stdin: str) -> str:
    # Through a pipe: the key never appears on a command line or in another file.
    r = subprocess.run(["openssl", *args], input=stdin, capture_output=True, text=True)
    if r.returncode != 0:
        raise ValueError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"openssl {args[0]} failed")
    return r.stdout


def read_site_file(path: Path, what: str, secret: bool, hint: str = HINT, limit: int = MAX_PEM_BYTES,
                   not_text: str = "not PEM text (DER? convert it with openssl)") -> str:
    """A file the site file names (a certificate, a key): a regular file, opened once and
    checked on that descriptor, at most `limit` bytes of ASCII, and when `secret`, readable
    by its owner only. ConfigError naming the file and the fix."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found", hint=hint) from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot open the {what}: {e.strerror}", hint=hint) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path}: the {what} is not a regular file", hint=hint)
        if secret and st.st_mode & 0o077:
            raise ConfigError(f"{path}: the {what} is readable by other users (mode {stat.S_IMODE(st.st_mode):04o})",
                              hint=f"chmod 600 {path}")
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ConfigError(f"{path}: larger than {limit // 1024} KiB; not a {what}", hint=hint)
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: {not_text}", hint=hint) from None



def load_certificates(path: Path) -> str:
    """A PEM file of CA certificates (tls.acme.ca): only its certificate blocks, each one
    readable by openssl."""
    text = read_site_file(path, "CA certificate", secret=False)
    blocks = [m.group(0) for m in _PEM.finditer(text)]
    if not blocks or any(m.group(1) != "CERTIFICATE" for m in _PEM.finditer(text)):
        raise ConfigError(f"{path}: expected PEM certificates only (BEGIN CERTIFICATE)",
                          hint="the CA that signed the ACME server's HTTPS certificate, as PEM")
    for block in blocks:
        try:
            _openssl(["x509", "-noout"], block + "\n")
        except ValueError as e:
            raise ConfigError(f"{path}: not a readable X.509 certificate: {e}") from None
    return "".join(b + "\n" for b in blocks)


def load(certificate: Path, key: Path, now: datetime.datetime | None = None) -> SiteCertificate:
    """Read and check the site's certificate and key: PEM, the key is the leaf's, and the
    leaf is valid now. Raises ConfigError naming the file and what to do."""
    chain = read_site_file(certificate, "certificate", secret=False)
    key_pem = read_site_file(key, "private key", secret=True)
    blocks = _PEM.findall(chain)
    if not blocks or any(kind != "CERTIFICATE" for kind, _ in blocks):
        raise ConfigError(f"{certificate}: expected PEM certificates only (BEGIN CERTIFICATE)", hint=HINT)
    # Only the PEM blocks go on: nothing else in the file reaches a node.
    chain = "".join(m.group(0) + "\n" for m in _PEM.finditer(chain))
    key_blocks = [m.group(0) for m in _PEM.finditer(key_pem)]
    if len(key_blocks) != 1 or "ENCRYPTED" in key_blocks[0].split("\n", 1)[0]:
        raise ConfigError(f"{key}: expected one unencrypted PEM private key",
                          hint="the nodes start unattended, so the key has no passphrase: openssl pkey -in KEY -out KEY.pem")
    key_pem = key_blocks[0] + "\n"
    try:
        info = _openssl(["x509", "-noout", "-subject", "-enddate", "-ext", "subjectAltName", "-nameopt", "RFC2253"],
                        chain)
        leaf_public = _openssl(["x509", "-noout", "-pubkey"], chain)
    except ValueError as e:
        raise ConfigError(f"{certificate}: not a readable X.509 certificate: {e}", hint=HINT) from None
    try:
        key_public = _openssl(["pkey", "-pubout"], key_pem)
    except ValueError:
        raise ConfigError(f"{key}: not a readable private key", hint=HINT) from None
    if key_public.strip() != leaf_public.strip():
        raise ConfigError(f"{key}: this key does not belong to the certificate in {certificate}",
                          hint="give the key the certificate was issued for (the leaf comes first in the chain file)")
    subject = re.search(r"^subject=\s*(.*)$", info, re.M)
    end = re.search(r"^notAfter=(.*)$", info, re.M)
    assert end is not None
    not_after = datetime.datetime.strptime(end.group(1).strip().replace("  ", " "), "%b %d %H:%M:%S %Y %Z").replace(
        tzinfo=datetime.timezone.utc)
    if not_after <= (now or datetime.datetime.now(datetime.timezone.utc)):
        raise ConfigError(f"{certificate}: the certificate expired on {not_after:%Y-%m-%d}",
                          hint="renew it, or remove the tls section (each node then makes a self-signed one)")
    names = tuple(re.findall(r"DNS:([^,\s]+)", info))
    return SiteCertificate(chain, key_pem, subject.group(1).strip() if subject else "", names, not_after, leaf_public)
