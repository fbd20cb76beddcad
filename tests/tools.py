"""Helpers for tests that act as an operator: ./build.py, loop devices, checksums."""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from appliance.paths import HOST_PATH

if TYPE_CHECKING:
    from appliance.plan import Plan

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def loop_device(backing: Path, size: int) -> Iterator[Path]:
    """A loop device over a new sparse file of `size` bytes; detached even on failure."""
    with open(backing, "wb") as fh:
        fh.truncate(size)
    dev = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True, text=True, check=True)
    path = Path(dev.stdout.strip())
    try:
        yield path
    finally:
        subprocess.run(["losetup", "-d", str(path)], capture_output=True)


def script_lib(dest: Path, role: "str | Plan", *libraries: Path) -> Path:
    """A directory laid out as /usr/lib/mailcluster is in `role`'s image on the example
    site (or in the image of the plan given): the shell libraries named (linked from
    overlays/) and the plan's constants (appliance/plan.py) that members.sh sources. For
    host tests of the images' scripts."""
    from appliance import paths
    from appliance.plan import Plan
    from appliance.profiles import ProfileSet
    from appliance.site import load_site

    dest.mkdir(parents=True, exist_ok=True)
    for lib in (paths.OVERLAYS / "10-base/usr/lib/mailcluster/members.sh", *libraries):
        (dest / lib.name).symlink_to(lib)
    if isinstance(role, str):
        profiles = ProfileSet.load()
        role = Plan.of(profiles, load_site(paths.EXAMPLE_SITE, profiles.roles), role)
    (dest / "plan.sh").write_text(role.constants())
    return dest


def zone_txt(zone: str) -> dict[str, bytes]:
    """The TXT records of a zone fragment (./build.py dns), owner name -> data with its
    strings joined, as a resolver hands them to a DKIM verifier."""
    import re

    out = {}
    for line in zone.splitlines():
        if m := re.match(r"^(\S+)\s+IN\s+TXT\s+(.*)$", line):
            out[m[1]] = "".join(re.findall(r'"([^"]*)"', m[2])).encode()
    return out


def digest(path: Path, length: int | None = None, offset: int = 0) -> str:
    """sha256 of a file or device (`length` bytes from `offset`; default: to the end)."""
    h = hashlib.sha256()
    left = length if length is not None else (os.stat(path).st_size or 1 << 62) - offset
    with open(path, "rb") as fh:
        fh.seek(offset)
        while left > 0 and (chunk := fh.read(min(4 << 20, left))):
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def build_py(*args: str, env: dict | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    """./build.py as an operator runs it."""
    return subprocess.run([sys.executable, str(ROOT / "build.py"), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, input=input, cwd=ROOT, timeout=900)


def site_certificate(dest: Path, names: list[str], days: int = 30) -> tuple[Path, Path, Path]:
    """A test CA and a certificate it issued for `names` (what an operator gets from a
    CA): returns (chain, key, ca) paths; the chain is the leaf, then the CA."""
    dest.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, leaf = (dest / n for n in ("ca.key", "ca.pem", "site.key", "site.csr", "leaf.pem"))

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    # The extensions a strict verifier wants (Python 3.13's default: X509_STRICT).
    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", str(days),
        "-subj", "/CN=mailcluster test CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-keyout", str(ca_key), "-out", str(ca))
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", f"/CN={names[0]}",
        "-keyout", str(key), "-out", str(csr))
    ext = dest / "ext.cnf"
    ext.write_text("subjectAltName=" + ",".join(f"DNS:{n}" for n in names) + "\nbasicConstraints=CA:FALSE\n"
                   "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
                   "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-days", str(days),
        "-extfile", str(ext), "-out", str(leaf))
    key.chmod(0o600)
    chain = dest / "site-chain.pem"
    chain.write_text(leaf.read_text() + ca.read_text())
    return chain, key, ca


PROMTOOL = shutil.which("promtool", path=HOST_PATH) or "promtool"


def samples(prom: Path) -> dict[str, float]:
    """A .prom file's samples, after promtool has accepted the file as Prometheus would."""
    text = prom.read_text()
    r = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr + text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


# GnuPG homes tests made keys in: their agents are stopped at the end of the session
# (conftest), as each key generation starts one.
GNUPG_HOMES: list[Path] = []


def gpg(home: Path, *args: str, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """GnuPG in `home`, without prompts (the tests' keys have no passphrase)."""
    return subprocess.run(["gpg", "--homedir", str(home), "--batch", "--pinentry-mode", "loopback",
                           "--passphrase", "", *args], input=input, capture_output=True, check=check)


def openpgp_key(home: Path, address: str, encrypt: bool = True, made: str | None = None) -> Path:
    """A new OpenPGP key of `address` in the GnuPG home `home`: an ed25519 primary key that
    certifies and signs, and (`encrypt`) a cv25519 subkey that encrypts, valid for a year
    from `made` (GnuPG's ISO time; default now). Returns the armored certificate
    (home/ADDRESS.asc), as a user hands it over."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    GNUPG_HOMES.append(home)
    when = ["--faked-system-time", made] if made else []
    expire = "1y"
    gpg(home, *when, "--quick-gen-key", f"Test User <{address}>", "ed25519", "cert,sign", expire)
    listing = gpg(home, "--with-colons", "--list-keys", address).stdout.decode()
    fingerprint = next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))
    if encrypt:
        gpg(home, *when, "--quick-add-key", fingerprint, "cv25519", "encr", expire)
    cert = home / f"{address}.asc"
    cert.write_bytes(gpg(home, "--armor", "--export", address).stdout)
    return cert


def stop_gpg_agents() -> None:
    for home in GNUPG_HOMES:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True)
    GNUPG_HOMES.clear()


def pgp_mime_signed(home: Path, sender: str, rcpt: str, token: str) -> bytes:
    """A message signed by `sender` (whose key is in `home`), PGP/MIME (RFC 3156), CRLF."""
    part = f"Content-Type: text/plain; charset=utf-8\r\n\r\nsigned body {token}\r\n".encode()
    sig = gpg(home, "--armor", "--detach-sign", "--local-user", sender, "--digest-algo", "SHA256",
              input=part).stdout
    b = b"signed-" + token.encode()
    return (f"From: {sender}\r\nTo: {rcpt}\r\nSubject: signed {token}\r\nMessage-ID: <{token}@example.org>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: multipart/signed; micalg=pgp-sha256;\r\n"
            f' protocol="application/pgp-signature"; boundary="{b.decode()}"\r\n\r\n').encode() \
        + b"--" + b + b"\r\n" + part + b"\r\n--" + b + b"\r\nContent-Type: application/pgp-signature\r\n\r\n" \
        + sig.replace(b"\n", b"\r\n") + b"\r\n--" + b + b"--\r\n"


def pgp_mime_verify(home: Path, message: bytes) -> str:
    """GnuPG's status lines for the signature of a PGP/MIME signed `message`, checked as a
    client does: the signed part's bytes with CRLF line ends (RFC 3156, section 5)."""
    import email
    import tempfile

    text = message.replace(b"\r\n", b"\n")
    boundary = email.message_from_bytes(text).get_param("boundary").encode()
    parts = text.split(b"\n--" + boundary)
    signed = parts[1].split(b"\n", 1)[1]
    signature = parts[2].split(b"\n\n", 1)[1]
    with tempfile.NamedTemporaryFile(suffix=".asc") as sig:
        sig.write(signature)
        sig.flush()
        r = gpg(home, "--status-fd", "2", "--verify", sig.name, "-", input=signed.replace(b"\n", b"\r\n"),
                check=False)
    return r.stderr.decode()


def pgp_mime_decrypt(home: Path, message: bytes) -> bytes:
    """The content of a PGP/MIME encrypted `message` (RFC 3156), decrypted with the secret
    key in `home`; AssertionError if the message is not PGP/MIME encrypted."""
    import email

    msg = email.message_from_bytes(message)
    assert msg.get_content_type() == "multipart/encrypted", msg.get_content_type()
    assert msg.get_param("protocol") == "application/pgp-encrypted"
    control, data = msg.get_payload()
    assert control.get_content_type() == "application/pgp-encrypted"
    assert control.get_payload().strip() == "Version: 1"
    assert data.get_content_type() == "application/octet-stream"
    r = gpg(home, "--decrypt", input=data.get_payload().encode(), check=False)
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout
