"""Certificates from an ACME CA (the site's tls.acme), which each node that serves TLS
obtains and renews itself with uacme (mailcluster-acme@.service, a timer twice a day).

HTTP-01 is answered without state: the answer to a challenge is its token and the
account key's thumbprint (RFC 8555, 8.1 and 8.3), so every node's port 80 answers any
challenge of the site's account (mailcluster-acme-challenge, a fixed reply to one
strictly matched request), and a name validates wherever it points (a frontend, a
mailstore) without the nodes telling each other anything. The account key stays in the
site's secrets and reaches only the nodes that order certificates (credential
mailcluster.acme-account); the thumbprint, which is public, reaches every node.
"""
from __future__ import annotations

import base64
import hashlib
import json
import subprocess
from typing import TYPE_CHECKING

from .site import Node, Site

if TYPE_CHECKING:
    from .credentials import Secrets


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


def names(site: Site, node: Node) -> list[str]:
    """The names `node`'s certificate covers: what senders and users reach it by. A filter:
    the MX hosts (./build.py dns). A mailstore: its own name (IMAP, submission), and the
    frontends' names when they relay submission to it."""
    from .dns import mx_hosts

    if node.role == "filter":
        return [h.rstrip(".") for h in mx_hosts(site)]
    out = [f"{node.name}.{site.domain}"]
    if site.proxied_submission_ports():
        out += [f"{n.name}.{site.domain}" for n in site.nodes_with_role("frontend")]
    return out


def credentials(site: Site, node: Node, secrets: "Secrets", orders: bool) -> dict[str, bytes]:
    """`node`'s ACME credentials (none without tls.acme): the thumbprint for its port 80;
    for a node that `orders` certificates, also the directory, contact and names
    (mailcluster.acme), the account key and the ACME server's CA, when the site gives one."""
    acme = site.tls.acme
    if acme is None:
        return {}
    key = secrets.acme_account_key()
    creds = {"mailcluster.acme-thumbprint": f"{thumbprint(key)}\n".encode()}
    if orders:
        creds["mailcluster.acme"] = f"{acme.directory}\n{acme.contact}\n{' '.join(names(site, node))}\n".encode()
        creds["mailcluster.acme-account"] = key.encode()
        ca = site.acme_ca()
        if ca is not None:
            creds["mailcluster.acme-ca"] = ca.encode()
    return creds
