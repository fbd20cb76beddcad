"""Host set-up: what a Debian 12 or 13 build machine needs, installed idempotently.

Debian 12 takes mkosi, systemd's boot tools, QEMU 10 and testssl.sh from
bookworm-backports (bookworm's own are too old); Debian 13 has all of them itself and
gets no extra apt source."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import ApplianceError
from .paths import HOST_PATH

BACKPORTS_SOURCES = Path("/etc/apt/sources.list.d/mailcluster-bookworm-backports.sources")
BACKPORTS = """\
# Added by ./build.py setup: mkosi 24.3 (bookworm has 14). Only this suite is added;
# never trixie, whose libc would then be pulled onto the host.
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""


# The hosts setup installs on (Debian VERSION_ID), and the mkosi versions the renderer
# writes configuration for (appliance/render.py reads the same range).
RELEASES = ("12", "13")
MKOSI_VERSIONS = ((24, 0), (26, 0))


@dataclass(frozen=True)
class Need:
    what: str                      # a command on PATH or an absolute path
    package: str
    backports: bool = False        # on Debian 12: from bookworm-backports
    package13: str | None = None   # the package's name on Debian 13, where it differs
    # The (major, minor) versions that will do, read from `what --version`: at least
    # `minimum`, below `below`; any other version counts as missing.
    minimum: tuple[int, int] | None = None
    below: tuple[int, int] | None = None

    def present(self) -> bool:
        if self.what.startswith("/"):
            return Path(self.what).exists()
        path = shutil.which(self.what, path=HOST_PATH)
        if path is None:
            return False
        if self.minimum is None and self.below is None:
            return True
        v = self.version(path) or (0, 0)
        return v >= (self.minimum or (0, 0)) and (self.below is None or v < self.below)

    def package_on(self, release: str) -> str:
        return self.package13 if release == "13" and self.package13 else self.package

    @property
    def wanted_version(self) -> str:
        if self.below and self.minimum and self.minimum[1] == 0 and self.below[1] == 0:
            return " " + " or ".join(f"{v}.x" for v in range(self.minimum[0], self.below[0]))
        return f" {self.minimum[0]}.{self.minimum[1]} or newer" if self.minimum else ""

    def found(self) -> str:
        path = self.what if self.what.startswith("/") else shutil.which(self.what, path=HOST_PATH)
        if path is None or not Path(path).exists():
            return "none"
        if self.minimum is None and self.below is None:
            return path
        v = self.version(path)
        return f"{path} {v[0]}.{v[1]}" if v else f"{path}, version unreadable"

    @staticmethod
    def version(path: str) -> tuple[int, int] | None:
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            return None
        found = re.search(r"\b(\d+)\.(\d+)", out)
        return (int(found.group(1)), int(found.group(2))) if found else None


NEEDS = [
    Need("mkosi", "mkosi", backports=True, minimum=MKOSI_VERSIONS[0], below=MKOSI_VERSIONS[1]),
    Need("systemd-repart", "systemd", backports=True, package13="systemd-repart"),
    Need("/usr/lib/systemd/ukify", "systemd", backports=True, package13="systemd-ukify"),
    Need("/usr/lib/systemd/boot/efi/systemd-bootx64.efi", "systemd-boot-efi", backports=True),
    Need("bootctl", "systemd-boot", backports=True, package13="systemd-boot-tools"),
    Need("/usr/lib/python3/dist-packages/pefile.py", "python3-pefile", backports=True),
    Need("depmod", "kmod"),
    Need("mkfs.vfat", "dosfstools"),
    Need("mcopy", "mtools"),
    Need("zstd", "zstd"),
    Need("xz", "xz-utils"),
    Need("cpio", "cpio"),
    Need("mkfs.ext4", "e2fsprogs"),
    Need("bwrap", "bubblewrap"),
    Need("systemd-nspawn", "systemd-container"),
    Need("/usr/share/keyrings/debian-archive-keyring.gpg", "debian-archive-keyring"),
    Need("apt-get", "apt"),
    Need("gpg", "gpg"),
    Need("/usr/share/OVMF/OVMF_CODE_4M.fd", "ovmf"),
    # QEMU 10's TCG runs the guests' process-heavy work 3-4 times faster than bookworm's
    # 7.2 (300 fork+exec in a guest: 3.9 s against 14.1 s), and every VM test waits on it.
    Need("qemu-system-x86_64", "qemu-system-x86", backports=True, minimum=(10, 0)),
    Need("qemu-img", "qemu-utils", backports=True, minimum=(10, 0)),
    Need("vde_switch", "vde2"),
    # A TPM 2.0 for the guests that need one (the takeover key sealed to it).
    Need("swtpm", "swtpm"),
    Need("sfdisk", "fdisk"),
    Need("losetup", "mount"),
    Need("ip", "iproute2"),
    # flash and publish/pull
    Need("bmaptool", "bmap-tools"),
    Need("gpgv", "gpgv"),
    # The test suite's release tests: a real registry and an independent client for it.
    Need("docker-registry", "docker-registry"),
    Need("skopeo", "skopeo"),
    # The hardening tests' audits: testssl.sh (3.2 from backports knows TLS 1.3 and
    # --nodns none) from here; Lynis is copied into each guest (images never carry it).
    Need("testssl", "testssl.sh", backports=True),
    Need("lynis", "lynis"),
    # The suite's static checks of the images' shell scripts, and the host tests that
    # run the images' backup and restore scripts (which copy with rsync).
    Need("shellcheck", "shellcheck"),
    Need("rsync", "rsync"),
    # The host tests of the mailstore's OpenPGP step run its pgp-wrap, which encrypts with
    # Sequoia's sqop (GnuPG, an independent implementation, decrypts in the tests).
    Need("sqop", "sqop"),
    # The DNS tests' resolver for `./build.py dns --check` (the binary only: no service).
    Need("dnsmasq", "dnsmasq-base"),
    # The test Internet's validating resolver and the tools that sign its zones (the DANE
    # tests); its own service is switched off, the tests run one in a namespace.
    Need("unbound", "unbound"),
    Need("ldns-signzone", "ldnsutils"),
    # The ACME tests' CA (a test server: it keeps nothing, and runs only when they start it).
    Need("pebble", "pebble"),
    # The test Internet's authoritative server for the site's zones, which takes the DNS-01
    # updates (its own service is switched off, like unbound's).
    Need("knotd", "knot"),
    # The monitoring tests' Prometheus (and promtool, which checks what ./build.py
    # monitoring prints); its own service is switched off too.
    Need("prometheus", "prometheus"),
]


def os_release() -> dict[str, str]:
    try:
        text = Path("/etc/os-release").read_text()
    except FileNotFoundError:
        return {}
    return {k: v.strip('"') for k, v in re.findall(r"^(\w+)=(.*)$", text, re.M)}


def missing() -> list[Need]:
    return [n for n in NEEDS if not n.present()]


def setup(log: Callable[[str], None] = print, install: bool = True) -> None:
    need = missing()
    if not need:
        log("host ready: every build and boot dependency is installed")
        return
    osr = os_release()
    release = osr.get("VERSION_ID", "") if osr.get("ID") == "debian" else ""
    if release not in RELEASES:
        listing = "\n".join(f"  - {n.what}{n.wanted_version} (Debian 12: {n.package}"
                            f"{' from bookworm-backports' if n.backports else ''}; Debian 13: {n.package_on('13')})"
                            for n in need)
        raise ApplianceError(
            f"unsupported host ({osr.get('PRETTY_NAME', 'unknown OS')}); setup installs only on Debian 12 or 13. "
            f"This host still needs:\n{listing}",
            hint="install these by hand (or the same tools under your distribution's names), "
                 "or use a Debian 12 or 13 machine",
        )
    backports = release == "12"
    listing = "\n".join(f"  - {n.what}{n.wanted_version} (Debian package {n.package_on(release)}"
                        f"{', from bookworm-backports' if n.backports and backports else ''})" for n in need)
    if not install:
        raise ApplianceError(f"the host is missing:\n{listing}", hint="run ./build.py setup")
    if os.geteuid() != 0:
        raise ApplianceError(f"setup must install packages as root; missing:\n{listing}", hint="sudo ./build.py setup")
    log(f"host is missing:\n{listing}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if backports and any(n.backports for n in need) and not _has_backports():
        log(f"adding the bookworm-backports apt source ({BACKPORTS_SOURCES}) for mkosi 24.3")
        BACKPORTS_SOURCES.write_text(BACKPORTS)
    _apt(["apt-get", "update", "-q"], env, log)
    bp = sorted({n.package_on(release) for n in need if n.backports and backports})
    rest = sorted({n.package_on(release) for n in need if not (n.backports and backports)})
    if bp:
        _apt(["apt-get", "install", "-y", "-q", "--no-install-recommends", "-t", "bookworm-backports", *bp], env, log)
    if rest:
        _apt(["apt-get", "install", "-y", "-q", "--no-install-recommends", *rest], env, log)
    if any(n.package == "docker-registry" for n in need) and Path("/run/systemd/system").exists():
        # The package starts a registry on port 5000; the tests run their own on 127.0.0.1.
        _apt(["systemctl", "disable", "--now", "docker-registry.service"], env, log)
    for package in ("unbound", "knot", "prometheus"):
        if any(n.package == package for n in need) and Path("/run/systemd/system").exists():
            # A server on the host that nothing asked for (DNS on port 53, Prometheus on 9090).
            _apt(["systemctl", "disable", "--now", f"{package}.service"], env, log)
    still = missing()
    if still:
        raise ApplianceError("setup finished but these are still missing:\n"
                             + "\n".join(f"  - {n.what}{n.wanted_version} ({n.package_on(release)}; "
                                          f"found: {n.found()})" for n in still))
    log("host ready")


def _has_backports() -> bool:
    for f in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]:
        try:
            if "bookworm-backports" in f.read_text():
                return True
        except OSError:
            continue
    return False


def _apt(cmd: list[str], env: dict, log: Callable[[str], None]) -> None:
    log("$ " + " ".join(cmd))
    r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        tail = "\n".join(r.stdout.splitlines()[-20:])
        raise ApplianceError(f"{cmd[0]} failed (exit {r.returncode}):\n{tail}",
                             hint="check the network and apt sources, then re-run ./build.py setup")
