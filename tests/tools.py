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
