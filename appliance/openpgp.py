"""Users' OpenPGP certificates (users[].openpgp): the mailstores encrypt each message to
its recipient's certificate before storing it (overlays/60-mailstore: pgp-deliver).

A certificate is checked here, when the site is loaded, by GnuPG in a scratch home: a
wrong file is refused before anything is built, never discovered as deferred mail.
"""
from __future__ import annotations

import base64
import hashlib
import re
import subprocess
import tempfile
from pathlib import Path

from .errors import ConfigError

# An armored certificate is a few KiB; a file far larger is not one.
MAX_CERTIFICATE_BYTES = 256 * 1024
ARMOR_BEGIN = "-----BEGIN PGP PUBLIC KEY BLOCK-----"
ARMOR_END = "-----END PGP PUBLIC KEY BLOCK-----"
HINT = ("export it with: gpg --armor --export ADDRESS > FILE (or sq cert export --cert-email ADDRESS), "
        "and give its path relative to the site file")


def read_certificate(path: Path, address: str) -> str:
    """The armored certificate in `path`, checked: one certificate, public parts only, a
    user ID with `address`, and a key that can encrypt now (not expired, not revoked)."""
    try:
        data = path.read_bytes()[:MAX_CERTIFICATE_BYTES + 1]
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the OpenPGP certificate: {e.strerror}", hint=HINT) from None
    if len(data) > MAX_CERTIFICATE_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CERTIFICATE_BYTES // 1024} KiB; not one OpenPGP certificate",
                          hint=HINT)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not an ASCII-armored OpenPGP certificate (binary?)",
                          hint="armor it: gpg --enarmor, or export with --armor; " + HINT) from None
    if "PRIVATE KEY BLOCK" in text:
        raise ConfigError(f"{path}: holds a secret key; the site takes only the public certificate "
                          "(the secret key stays with its user, never on a node)", hint=HINT)
    blocks = text.count(ARMOR_BEGIN)
    if blocks != 1 or text.count(ARMOR_END) != 1 or text.find(ARMOR_END) < text.find(ARMOR_BEGIN):
        raise ConfigError(f"{path}: expected one ASCII-armored public key block, found {blocks}", hint=HINT)
    cert = text[text.find(ARMOR_BEGIN):text.find(ARMOR_END) + len(ARMOR_END)] + "\n"
    records = _show(path, cert)
    keys = [r for r in records if r[0] in ("pub", "sec")]
    if any(r[0] == "sec" for r in keys):
        raise ConfigError(f"{path}: holds a secret key; the site takes only the public certificate", hint=HINT)
    if len(keys) != 1:
        raise ConfigError(f"{path}: holds {len(keys)} certificates; expected the one of {address}", hint=HINT)
    pub = keys[0]
    uids = [_unescape(r[9]) for r in records if r[0] == "uid" and len(r) > 9 and r[1] not in ("r", "e")]
    if not any(f"<{address}>" in uid.lower() or uid.strip().lower() == address for uid in uids):
        raise ConfigError(f"{path}: no user ID of this certificate is {address} (it has: "
                          + (", ".join(repr(u) for u in uids) or "none") + ")",
                          hint=f"use {address}'s own certificate, or add the address to its user IDs")
    if pub[1] in ("r", "e"):
        raise ConfigError(f"{path}: the certificate is {'revoked' if pub[1] == 'r' else 'expired'}",
                          hint=f"ask {address} for a current certificate")
    if "E" not in pub[11]:
        raise ConfigError(f"{path}: no key of this certificate can encrypt now (expired, revoked or "
                          "signing-only subkeys)", hint=f"ask {address} for a certificate with a valid encryption subkey")
    return cert


def _show(path: Path, cert: str) -> list[list[str]]:
    """GnuPG's colon listing of `cert`, read in a scratch home (nothing is imported)."""
    with tempfile.TemporaryDirectory(prefix="mc-gpg-") as home:
        try:
            r = subprocess.run(["gpg", "--homedir", home, "--batch", "--no-autostart", "--with-colons",
                                "--fixed-list-mode", "--show-keys"],
                               input=cert, capture_output=True, text=True, timeout=60)
        except FileNotFoundError:
            raise ConfigError("cannot check OpenPGP certificates: gpg is missing",
                              hint="run ./build.py setup") from None
    if r.returncode != 0 or not r.stdout.strip():
        why = (r.stderr.strip().splitlines() or ["unreadable"])[-1]
        raise ConfigError(f"{path}: not a valid OpenPGP certificate ({why})", hint=HINT)
    return [line.split(":") for line in r.stdout.splitlines()]


def _unescape(value: str) -> str:
    """GnuPG's colon listings escape ':' and control characters as \\xNN."""
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), value)


def certificates(site) -> str:
    """The mailcluster.openpgp credential: per user with a certificate, a line
    `user ADDRESS` and the armored certificate (overlays/60-mailstore: openpgp-certs)."""
    lines = [f"# OpenPGP certificates of site {site.name}'s users: mail to them is stored encrypted\n"]
    for u in site.users:
        if u.openpgp is not None:
            lines += [f"user {u.address}\n", read_certificate(u.openpgp, u.address)]
    return "".join(lines)


# ---- Web Key Directory (draft-koch-openpgp-webkey-service) ----------------------------
ZBASE32 = "ybndrfg8ejkmcpqxot1uwisza345h769"


def wkd_hash(address: str) -> str:
    """The WKD name of an address's key: the SHA-1 of its lower-cased local part, in
    z-base-32 (32 characters)."""
    digest = hashlib.sha1(address.split("@", 1)[0].lower().encode()).digest()  # noqa: S324 (the draft's choice)
    bits = "".join(f"{b:08b}" for b in digest)
    return "".join(ZBASE32[int(bits[i:i + 5], 2)] for i in range(0, len(bits), 5))


def dearmor(cert: str) -> bytes:
    """The binary certificate WKD serves, from its armored form (GnuPG's --dearmor)."""
    with tempfile.TemporaryDirectory(prefix="mc-gpg-") as home:
        r = subprocess.run(["gpg", "--homedir", home, "--batch", "--no-autostart", "--dearmor"],
                           input=cert.encode(), capture_output=True, timeout=60)
    if r.returncode != 0:
        raise ConfigError(f"cannot dearmor an OpenPGP certificate: {r.stderr.decode(errors='replace').strip()}")
    return r.stdout


def wkd_credential(site) -> str:
    """The mailcluster.wkd credential of the frontends: the domains whose directory they
    serve, `direct` for the direct method too, and per user with a certificate
    `key DOMAIN HASH BASE64` (the binary certificate; overlays/40-frontend: wkd)."""
    lines = [f"# Web Key Directory of site {site.name} (appliance/openpgp.py)\n"]
    lines += [f"domain {d}\n" for d in site.mail_domains]
    if site.wkd is not None and site.wkd.direct:
        lines.append("direct\n")
    for u in site.users:
        if u.openpgp is not None:
            binary = dearmor(read_certificate(u.openpgp, u.address))
            lines.append(f"key {u.address.split('@', 1)[1]} {wkd_hash(u.address)} {base64.b64encode(binary).decode()}\n")
    return "".join(lines)
