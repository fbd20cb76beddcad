"""Node identity and secrets, delivered as systemd credentials.

Secrets never enter an image or git: they are generated on first use into a per-site
secrets directory (mode 0700) and handed to nodes only as credentials (SMBIOS type 11 in
QEMU, *.cred files on the ESP for bare metal).

Credentials a node receives (every image of a role is the same; these make it a node):
  system.hostname                 the node's name
  network.network.10-cluster      its static address on the cluster NIC (systemd-networkd)
  mailcluster.node                "NAME ROLE ADDRESS": checked against the image's role
  mailcluster.resolvers           the site's DNS resolvers, an address per line (absent: the
                                  node resolves nothing); identity writes /etc/resolv.conf
  mailcluster.peers               the cluster as the site describes it now (node, user,
                                  alias, catchall and backup records; overlays/10-base/usr/lib/mailcluster/members.sh)
  mailcluster.cluster-key         the node's own SSH key for announcements to the other
                                  members (secret, one per node)
  mailcluster.cluster-cert        that key's certificate, signed by the site's node CA: the
                                  node's name and role (key ID NAME:ROLE, principal NAME),
                                  usable only from its address (source-address)
  mailcluster.node-ca             the node CA's public key: a member admits announcements
                                  only from keys it signed, each speaking for its own name
  mailcluster.mailstore-key       mailstore: the eCryptfs passphrase of its mail store
  mailcluster.mail-users          mailstore: Dovecot passwd-file (hashes only, quotas)
  mailcluster.pairing-key         a primary mailstore: the secret it shares with its backup
                                  (an SSH key: proving it is what lets the primary pair)
  mailcluster.pairing-key.PRIMARY a backup mailstore: the same secret, for each primary
  mailcluster.openpgp             mailstore: per user with an OpenPGP certificate, "user ADDRESS"
                                  and the armored certificate (public): mail to ADDRESS is
                                  stored encrypted to it (appliance/openpgp.py)
  mailcluster.backup              mailstore in a backup pair: lines schedule= (OnCalendar=,
                                  primary only), recent=, daily=, monthly= (retention)
  mailcluster.spool-key           filter: the eCryptfs passphrase of its Postfix queue
  mailcluster.dkim-key.DOMAIN     filter: the private key that signs DOMAIN's outgoing mail
  mailcluster.dkim-selectors      filter: "DOMAIN SELECTOR" per line, the selector each
                                  domain signs with (its public key: ./build.py dns)
  mailcluster.acme-thumbprint     with tls.acme: the ACME account key's thumbprint (public),
                                  which every node's port 80 answers challenges with
  mailcluster.acme                with tls.acme, filter, mailstore (and frontend with
                                  tls.mta_sts): lines directory URL, contact, the names its
                                  certificate covers (appliance/acme.py)
  mailcluster.acme-account        ... the site's ACME account key (secret)
  mailcluster.acme-ca             ... the CA of the ACME server's HTTPS, when the site gives one
  mailcluster.acme-dns            ... with tls.acme.dns_update: "ADDRESS PORT" of the site's DNS
  mailcluster.acme-dns-key        server, and the TSIG key its DNS-01 updates are signed with
  mailcluster.mta-sts             frontend, with tls.mta_sts: the MTA-STS policy it serves
  mailcluster.wkd                 frontend, with wkd: the users' certificates (binary, base64)
                                  it serves as the Web Key Directory (appliance/openpgp.py)
  mailcluster.tls-cert            filter, mailstore: the site's certificate chain (PEM), when
  mailcluster.tls-key             the site file gives one (tls:), and its key; without them
                                  the node makes a self-signed one (mailcluster-tls.service)
"""
from __future__ import annotations

import base64
import os
import secrets as pysecrets
import subprocess
import tempfile
from pathlib import Path

from . import acme, openpgp, paths
from .passwords import hash_password
from .site import Node, Site


class Secrets:
    """The site's secrets directory: created 0700, files 0600, generated when missing."""

    def __init__(self, root: Path):
        self.root = root

    @classmethod
    def of(cls, site: Site) -> "Secrets":
        """The site's own secrets, where every command keeps them (paths.SECRETS/SITE)."""
        return cls(paths.SECRETS / site.name)

    def _path(self, *parts: str) -> Path:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        path = self.root.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        return path

    def get_or_create(self, *parts: str, make) -> str:
        path = self._path(*parts)
        if not path.exists():
            self.write(*parts, text=make())
        return path.read_text()

    def read(self, *parts: str) -> str | None:
        path = self.root.joinpath(*parts)
        return path.read_text() if path.exists() else None

    def write(self, *parts: str, text: str) -> None:
        """Replace a file atomically (a crash leaves the old one or the new one), 0600."""
        path = self._path(*parts)
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        tmp.replace(path)

    def remove(self, *parts: str) -> None:
        self.root.joinpath(*parts).unlink(missing_ok=True)

    def user_password(self, address: str) -> str:
        return self.get_or_create("users", f"{address}.password", make=lambda: pysecrets.token_urlsafe(18))

    def user_hash(self, address: str) -> str:
        pw = self.user_password(address)
        return self.get_or_create(
            "users", f"{address}.hash",
            make=lambda: hash_password(pw))

    def node_ca(self) -> str:
        """The site's node CA: an ed25519 SSH key that signs each node's cluster key. It
        stays here, on the operator's machine: no node holds it, so no node's disk can
        make another node."""
        return self.get_or_create("node-ca", make=lambda: ssh_key("mailcluster-node-ca"))

    def node_ca_public(self) -> str:
        return public_key(self.node_ca())

    def cluster_key(self, node: str) -> str:
        """The node's own SSH key for speaking to the other members."""
        return self.get_or_create("nodes", node, "cluster-key", make=lambda: ssh_key(f"mailcluster {node}"))

    def cluster_cert(self, node: Node) -> str:
        """The node CA's certificate for the node's cluster key, binding name, role and
        address (one file per role and address: a moved node gets a new one)."""
        key = self.cluster_key(node.name)
        return self.get_or_create(
            "nodes", node.name, f"cluster-key-cert.{node.role}.{node.address}.pub",
            make=lambda: sign_node_key(self.node_ca(), public_key(key), node))

    def pairing_key(self, primary: str) -> str:
        """The secret a primary mailstore and its backup share: an ed25519 SSH key."""
        return self.get_or_create("pairs", f"{primary}.pairing-key", make=lambda: ssh_key(f"mailcluster-pairing {primary}"))

    def dkim_selector(self, domain: str) -> str:
        """The selector DOMAIN's outgoing mail is signed with now (the selector file's first
        line; the rest is appliance/dkim.py's rotation state)."""
        return self.get_or_create("dkim", domain, "selector", make=lambda: f"{DKIM_FIRST_SELECTOR}\n").split("\n")[0].strip()

    def dkim_key(self, domain: str, selector: str | None = None) -> str:
        """The private key of DOMAIN's selector (default: the current one)."""
        selector = selector or self.dkim_selector(domain)
        return self.get_or_create("dkim", domain, f"{selector}.key", make=dkim_private_key)

    def acme_account_key(self) -> str:
        """The site's ACME account key (tls.acme), shared by the nodes that order."""
        from .acme import new_account_key

        return self.get_or_create("acme", "account.key", make=new_account_key)

    def mailstore_key(self, node: str) -> str:
        # 32 random bytes as text: eCryptfs derives the file-encryption key from it.
        return self.get_or_create("nodes", node, "ecryptfs.passphrase", make=lambda: pysecrets.token_hex(32))

    def spool_key(self, node: str) -> str:
        """A filter's key for its Postfix queue (eCryptfs), like a mailstore's for its store."""
        return self.get_or_create("nodes", node, "spool.passphrase", make=lambda: pysecrets.token_hex(32))


def ssh_key(comment: str) -> str:
    """A new ed25519 SSH private key (OpenSSH format)."""
    with tempfile.TemporaryDirectory() as tmp:
        key = Path(tmp) / "key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key)],
                       check=True, capture_output=True)
        return key.read_text()


# A new site's first DKIM selector; a rotation moves to the next.
DKIM_FIRST_SELECTOR = "mc1"


def dkim_private_key() -> str:
    """RSA 2048: what every receiver verifies (Ed25519 signatures, RFC 8463, are not
    checked by the large providers yet). PEM, through a pipe: never a file elsewhere."""
    return subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
                          check=True, capture_output=True, text=True).stdout


def dkim_public_key(private: str) -> str:
    """The p= value of a DKIM record: the public key, DER, base64."""
    der = subprocess.run(["openssl", "pkey", "-pubout", "-outform", "DER"], input=private.encode(),
                         check=True, capture_output=True).stdout
    return base64.b64encode(der).decode()


def public_key(private: str) -> str:
    """The public half of an OpenSSH private key."""
    r = subprocess.run(["ssh-keygen", "-y", "-f", "/dev/stdin"], input=private, check=True,
                       capture_output=True, text=True)
    return r.stdout


def sign_node_key(ca: str, public: str, node: Node) -> str:
    """A user certificate for `public`, for the node's account on its peers: key ID
    NAME:ROLE (read by the receiving side's principals command), principal NAME, no
    extensions (no terminal, no forwarding), and valid only from the node's address."""
    with tempfile.TemporaryDirectory() as tmp:
        ca_file, pub_file = Path(tmp) / "ca", Path(tmp) / "node.pub"
        fd = os.open(ca_file, os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(ca)
        pub_file.write_text(public)
        subprocess.run(["ssh-keygen", "-q", "-s", str(ca_file), "-I", f"{node.name}:{node.role}", "-n", node.name,
                        "-O", "clear", "-O", f"source-address={node.address}/32", str(pub_file)],
                       check=True, capture_output=True)
        return (Path(tmp) / "node-cert.pub").read_text()


def mail_users(site: Site, secrets: Secrets) -> str:
    """Dovecot passwd-file: address, strong hash, per-user quota. No plaintext."""
    lines = []
    for u in site.users:
        pw_hash = u.password_hash or secrets.user_hash(u.address)
        lines.append(f"{u.address}:{pw_hash}::::::userdb_quota_storage_size={u.quota}\n")
    return "".join(lines)


def peers(site: Site) -> str:
    """The mailcluster.peers credential: every node, where each user's mail lives, the
    aliases, and who backs up whom. A backup mailstore starts as standby: it holds no mailboxes
    until it takes over."""
    backups = {p.backup for p in site.backups}
    lines = [f"# cluster {site.name}, as the site file describes it\n"]
    lines += [f"node {n.name} {n.role} {n.address} {'standby' if n.name in backups else 'active'}\n"
              for n in site.nodes]
    lines += [f"user {u.address} {site.mailstore_of(u)}\n" for u in site.users]
    lines += [f"alias {address} {','.join(targets)}\n" for address, targets in site.all_aliases.items()]
    lines += [f"catchall {c.domain} {','.join(c.to)}\n" for c in site.catch_all]
    lines += [f"backup {p.primary} {p.backup}\n" for p in site.backups]
    return "".join(lines)


# The keys to the encrypted stores: a mailstore's mail and a filter's queue. Whoever holds
# the disk reads its ESP, so `flash` leaves them off it (README: bare metal).
STORE_KEYS = ("mailcluster.mailstore-key", "mailcluster.spool-key")

# The roles that terminate mail's TLS, the filters' SMTP and the mailstores' submission
# and IMAP: they get the site's certificate. A frontend passes mail's TLS through
# untouched, so the site's key never reaches the node most exposed to the world (for
# the MTA-STS policy it serves, it gets a certificate of its own: appliance/acme.py).
TLS_ROLES = ("filter", "mailstore")


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
        "mailcluster.node": f"{node.name} {node.role} {node.address}\n".encode(),
        "mailcluster.peers": peers(site).encode(),
        "mailcluster.cluster-key": secrets.cluster_key(node.name).encode(),
        "mailcluster.cluster-cert": secrets.cluster_cert(node).encode(),
        "mailcluster.node-ca": secrets.node_ca_public().encode(),
    }
    if site.network.resolvers:
        creds["mailcluster.resolvers"] = "".join(f"{a}\n" for a in site.network.resolvers).encode()
    creds.update(acme.credentials(site, node, secrets))
    if node.role in TLS_ROLES:
        cert = site.site_certificate()
        if cert is not None:
            creds["mailcluster.tls-cert"] = cert.chain.encode()
            creds["mailcluster.tls-key"] = cert.key.encode()
    if node.role == "filter":
        # Mail waits in a filter's queue while the mailstores are down: on eCryptfs.
        creds["mailcluster.spool-key"] = secrets.spool_key(node.name).encode()
        # Outgoing mail leaves through the filters, which sign it (rspamd's dkim_signing).
        for domain in site.mail_domains:
            creds[f"mailcluster.dkim-key.{domain}"] = secrets.dkim_key(domain).encode()
        creds["mailcluster.dkim-selectors"] = "".join(
            f"{d} {secrets.dkim_selector(d)}\n" for d in site.mail_domains).encode()
    if node.role == "mailstore":
        creds["mailcluster.mailstore-key"] = secrets.mailstore_key(node.name).encode()
        creds["mailcluster.mail-users"] = mail_users(site, secrets).encode()
        # Every mailstore: a backup that takes over stores its primary's users' mail.
        creds["mailcluster.openpgp"] = openpgp.certificates(site).encode()
        r = site.retention
        policy = f"recent={r.recent}\ndaily={r.daily}\nmonthly={r.monthly}\n"
        for pair in site.backups:
            if pair.primary == node.name:
                creds["mailcluster.pairing-key"] = secrets.pairing_key(pair.primary).encode()
                creds["mailcluster.backup"] = f"schedule={pair.schedule}\n{policy}".encode()
            elif pair.backup == node.name:
                creds[f"mailcluster.pairing-key.{pair.primary}"] = secrets.pairing_key(pair.primary).encode()
                creds["mailcluster.backup"] = policy.encode()
    return creds
