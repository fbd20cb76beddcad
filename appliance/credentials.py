"""Node identity and secrets, delivered as systemd credentials.

Secrets never enter an image or git: they are generated on first use into a per-site
secrets directory (mode 0700) and handed to nodes only as credentials (SMBIOS type 11 in
QEMU, *.cred files on the ESP for bare metal).

Credentials a node receives:
  system.hostname                 the node's name
  network.network.10-cluster      its static address on the cluster NIC (systemd-networkd)
  mailcluster.mailstore-key       mailstore: the eCryptfs passphrase of its mail store
  mailcluster.mail-users          mailstore: Dovecot passwd-file (hashes only, quotas)
"""
from __future__ import annotations

import os
import secrets as pysecrets
import warnings
from pathlib import Path

from .site import Node, Site

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import crypt  # SHA512-CRYPT, which Dovecot verifies natively

HASH_ROUNDS = 200_000


class Secrets:
    """The site's secrets directory: created 0700, files 0600, generated when missing."""

    def __init__(self, root: Path):
        self.root = root

    def _path(self, *parts: str) -> Path:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        path = self.root.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        return path

    def get_or_create(self, *parts: str, make) -> str:
        path = self._path(*parts)
        if not path.exists():
            tmp = path.with_name(f".{path.name}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(make())
            tmp.replace(path)
        return path.read_text()

    def user_password(self, address: str) -> str:
        return self.get_or_create("users", f"{address}.password", make=lambda: pysecrets.token_urlsafe(18))

    def user_hash(self, address: str) -> str:
        pw = self.user_password(address)
        return self.get_or_create(
            "users", f"{address}.hash",
            make=lambda: "{SHA512-CRYPT}" + crypt.crypt(pw, crypt.mksalt(crypt.METHOD_SHA512, rounds=HASH_ROUNDS)))

    def mailstore_key(self, node: str) -> str:
        # 32 random bytes as text: eCryptfs derives the file-encryption key from it.
        return self.get_or_create("nodes", node, "ecryptfs.passphrase", make=lambda: pysecrets.token_hex(32))


def mail_users(site: Site, secrets: Secrets) -> str:
    """Dovecot passwd-file: address, strong hash, per-user quota. No plaintext."""
    lines = []
    for u in site.users:
        pw_hash = u.password_hash or secrets.user_hash(u.address)
        lines.append(f"{u.address}:{pw_hash}::::::userdb_quota_storage_size={u.quota}\n")
    return "".join(lines)


def node_credentials(site: Site, node: Node, mac: str | None, secrets: Secrets) -> dict[str, bytes]:
    """Everything that makes `node` itself, as systemd credentials."""
    net = site.network.cluster
    match = f"MACAddress={mac}" if mac else "Name=en*"
    network = (
        "[Match]\n" f"{match}\n\n"
        "[Network]\n" f"Address={node.address}/{net.prefixlen}\n"
        "LinkLocalAddressing=no\nIPv6AcceptRA=no\n"
    )
    if site.network.gateway:
        network += f"Gateway={site.network.gateway}\n"
    creds = {
        "system.hostname": node.name.encode(),
        # systemd-network-generator turns this into /run/systemd/network/10-cluster.network.
        "network.network.10-cluster": network.encode(),
    }
    if node.role == "mailstore":
        creds["mailcluster.mailstore-key"] = secrets.mailstore_key(node.name).encode()
        creds["mailcluster.mail-users"] = mail_users(site, secrets).encode()
    return creds
