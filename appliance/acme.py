"""Certificates from an ACME CA (the site's tls.acme), which each node that serves TLS
obtains and renews itself with uacme (mailcluster-acme@.service, a timer twice a day).

HTTP-01 is answered without state: the answer to a challenge is its token and the
account key's thumbprint (RFC 8555, 8.1 and 8.3), so every node's port 80 answers any
challenge of the site's account (mailcluster-acme-challenge, a fixed reply to one
strictly matched request), and a name validates wherever it points (a frontend, a
mailstore) without the nodes telling each other anything. The account key stays in the
site's secrets and reaches only the nodes that order certificates (credential
mailcluster.acme-account); the thumbprint, which is public, reaches every node.

DNS-01, where the site names its DNS server (tls.acme.dns_update): the nodes that order
put each challenge into the site's zone themselves with an RFC 2136 update signed with
the site's TSIG key (credentials mailcluster.acme-dns and mailcluster.acme-dns-key;
acme-hook), and take it out again.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from .credentials import Secrets
    from .site import Node, Site


# One TSIG key as tsig-keygen (BIND) and keymgr (Knot) write it.
_TSIG = re.compile(r'\s*key\s+"?(?P<name>[A-Za-z0-9][A-Za-z0-9.-]{0,252})"?\s*\{\s*'
                   r'algorithm\s+"?(?P<algorithm>hmac-sha(?:256|384|512))"?\s*;\s*'
                   r'secret\s+"(?P<secret>[A-Za-z0-9+/]{16,512}={0,2})"\s*;\s*\}\s*;\s*')
TSIG_HINT = "make one with: tsig-keygen -a hmac-sha256 acme-update > KEY; chmod 600 KEY (and give it to the DNS server)"


def load_tsig_key(path: Path) -> str:
    """The site's TSIG key for DNS-01 updates: one key, not readable by others, rewritten
    from its parts (nothing else in the file reaches a node)."""
    from .tls import read_site_file

    text = read_site_file(path, "TSIG key", secret=True, hint=TSIG_HINT, limit=4096, not_text="not a TSIG key file")
    m = _TSIG.fullmatch(text)
    if m is None:
        raise ConfigError(f"{path}: expected one TSIG key (key \"NAME\" {{ algorithm hmac-sha256; secret \"...\"; }};)",
                          hint=TSIG_HINT)
    return f'key "{m["name"]}" {{\n\talgorithm {m["algorithm"]};\n\tsecret "{m["secret"]}";\n}};\n'


def new_account_key() -> str:
    """EC P-256 (what uacme reads as an account key, and small enough to travel as a
    credential). PEM, through a pipe: never a file elsewhere."""
    return subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
                          check=True, capture_output=True, text=True).stdout


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def thumbprint(account_key: str) -> str:
    """The JWK thumbprint (RFC 7638) of an EC P-256 key: what a key authorization ends with."""
    der = subprocess.run(["openssl", "pkey", "-pubout", "-outform", "DER"], input=account_key.encode(),
                         check=True, capture_output=True).stdout
    point = der[-65:]  # SubjectPublicKeyInfo ends with the uncompressed point: 04 || x || y
    if point[0] != 4 or len(der) != 91:
        raise ValueError("the ACME account key is not an EC P-256 key")
    jwk = {"crv": "P-256", "kty": "EC", "x": _b64url(point[1:33]), "y": _b64url(point[33:])}
    return _b64url(hashlib.sha256(json.dumps(jwk, separators=(",", ":"), sort_keys=True).encode()).digest())


def orders(site: Site, node: Node) -> bool:
    """Whether `node` orders a certificate from the site's ACME CA: the roles that
    terminate mail's TLS do, and the frontends when they serve HTTPS (the MTA-STS policy,
    the Web Key Directory), for those names only (they pass mail's TLS through untouched)."""
    from .credentials import TLS_ROLES

    if site.tls.acme is None:
        return False
    return node.role in TLS_ROLES or (node.role == "frontend" and serves_https(site))


def serves_https(site: Site) -> bool:
    """Whether the frontends answer HTTPS on 443: the MTA-STS policy, the Web Key Directory."""
    return site.tls.mta_sts is not None or site.wkd is not None


def names(site: Site, node: Node) -> list[str]:
    """The names `node`'s certificate covers: what senders and users reach it by. A filter:
    the MX hosts (./build.py dns). A mailstore: its own name (IMAP, submission), and the
    frontends' names when they relay submission to it. A frontend: each domain's
    mta-sts. name, where it serves the MTA-STS policy, and openpgpkey. name (and with
    wkd.direct the domain itself), where it serves the Web Key Directory."""
    from .dns import mx_hosts

    if node.role == "filter":
        return [h.rstrip(".") for h in mx_hosts(site)]
    if node.role == "frontend":
        out = [f"mta-sts.{d}" for d in site.mail_domains] if site.tls.mta_sts is not None else []
        if site.wkd is not None:
            out += [f"openpgpkey.{d}" for d in site.mail_domains]
            out += list(site.mail_domains) if site.wkd.direct else []
        return out
    out = [f"{node.name}.{site.domain}"]
    if site.proxied_submission_ports():
        out += [f"{n.name}.{site.domain}" for n in site.nodes_with_role("frontend")]
    return out


def credentials(site: Site, node: Node, secrets: "Secrets") -> dict[str, bytes]:
    """`node`'s ACME credentials (none without tls.acme): the thumbprint for its port 80
    (HTTP-01 only); for a node that orders certificates, also the directory, contact and
    names (mailcluster.acme), the account key, the ACME server's CA when the site gives
    one, and the DNS server and TSIG key for DNS-01; for a frontend, the MTA-STS policy
    (mailcluster.mta-sts) and the Web Key Directory (mailcluster.wkd) it serves."""
    from .dns import mta_sts_policy
    from .openpgp import wkd_credential

    acme = site.tls.acme
    if acme is None:
        return {}
    key = secrets.acme_account_key()
    creds: dict[str, bytes] = {}
    if acme.dns_update is None:
        # HTTP-01 (with DNS-01 nothing listens on port 80).
        creds["mailcluster.acme-thumbprint"] = f"{thumbprint(key)}\n".encode()
    if node.role == "frontend" and site.tls.mta_sts is not None:
        creds["mailcluster.mta-sts"] = mta_sts_policy(site).encode()
    if node.role == "frontend" and site.wkd is not None:
        creds["mailcluster.wkd"] = wkd_credential(site).encode()
    if orders(site, node):
        creds["mailcluster.acme"] = f"{acme.directory}\n{acme.contact}\n{' '.join(names(site, node))}\n".encode()
        creds["mailcluster.acme-account"] = key.encode()
        ca = site.acme_ca()
        if ca is not None:
            creds["mailcluster.acme-ca"] = ca.encode()
        if acme.dns_update is not None:
            creds["mailcluster.acme-dns"] = f"{acme.dns_update.server} {acme.dns_update.port}\n".encode()
            creds["mailcluster.acme-dns-key"] = load_tsig_key(acme.dns_update.key).encode()
    return creds
