"""Writing an image onto a server's disk: only mapped blocks, verified by reading back,
then the node's credentials onto the ESP so the machine boots as that node.

Everything that can refuse is checked before the first byte is written, so a refused
flash changes nothing on the target."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import stat
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import ApplianceError
from .paths import HOST_PATH

ESP_TYPE = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
BLKFLSBUF = 0x1261
CHUNK = 4 << 20
# systemd's id for credentials sealed with the null key (no TPM, no host key): the only
# kind a machine can open on its first boot, before it has any key of its own.
NULL_KEY_ID = bytes.fromhex("058469daf6f54324800549da0f8ea2fb")


class FlashError(ApplianceError):
    exit_code = 4


# ---- bmap: which blocks of a sparse image hold data, with a checksum per range ------------
@dataclass(frozen=True)
class Bmap:
    image_size: int
    block_size: int
    ranges: tuple[tuple[int, int, str], ...]   # (first block, last block, sha256)

    @property
    def mapped_bytes(self) -> int:
        return sum(self.span(r)[1] for r in self.ranges)

    def span(self, rng: tuple[int, int, str]) -> tuple[int, int]:
        first, last, _ = rng
        start = first * self.block_size
        end = min((last + 1) * self.block_size, self.image_size)
        return start, end - start


def load_bmap(path: Path) -> Bmap:
    try:
        root = ET.parse(path).getroot()
        if root.findtext("ChecksumType", "").strip() != "sha256":
            raise ValueError("only sha256 bmap files are supported")
        block_map = root.find("BlockMap")
        if block_map is None:
            raise ValueError("no BlockMap")
        ranges = []
        for r in block_map:
            first, _, last = (r.text or "").strip().partition("-")
            sha = r.get("chksum")
            if sha is None:
                raise ValueError(f"range {r.text!r} has no chksum")
            ranges.append((int(first), int(last or first), sha))
        return Bmap(int(root.findtext("ImageSize", "")), int(root.findtext("BlockSize", "")), tuple(ranges))
    except (ET.ParseError, ValueError, TypeError, AttributeError) as e:
        raise FlashError(f"{path}: not a usable bmap file ({e})",
                         hint="delete it; flash and publish make a new one with bmaptool") from None


def ensure_bmap(image: Path) -> Path:
    """The image's .bmap, made with Debian's bmaptool when missing or older than the image."""
    bmap = image.with_suffix(".bmap")
    if bmap.exists() and bmap.stat().st_mtime >= image.stat().st_mtime:
        return bmap
    tmp = bmap.with_name(f".{bmap.name}.tmp")
    r = subprocess.run(["bmaptool", "create", "-o", str(tmp), str(image)], capture_output=True, text=True,
                       env={**os.environ, "PATH": HOST_PATH})
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise FlashError(f"bmaptool create failed for {image}: {r.stderr.strip()}", hint="run ./build.py setup")
    tmp.replace(bmap)
    return bmap


# ---- the image and what it should be ------------------------------------------------------
def recorded_sha256(image: Path) -> str:
    """The checksum the build (or pull) recorded for `image`, from SHA256SUMS beside it."""
    sums = image.parent / "SHA256SUMS"
    if sums.exists():
        for line in sums.read_text().splitlines():
            digest, _, name = line.partition("  ")
            if name.strip().lstrip("*") == image.name:
                return digest.strip()
    raise FlashError(f"{image}: no checksum recorded for it in {sums}",
                     hint="flash images made by ./build.py build or fetched by ./build.py pull; "
                          "both record checksums beside the image")


def image_role(image: Path) -> str | None:
    manifest = image.with_name(image.name.removesuffix(".raw") + ".manifest.json")
    if manifest.exists():
        return json.loads(manifest.read_text()).get("role")
    return None


def verify_image(image: Path, expected: str, progress: Callable[[str], None]) -> None:
    progress(f"checking {image.name} against its recorded sha256")
    h = hashlib.sha256()
    with open(image, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    if h.hexdigest() != expected:
        raise FlashError(f"{image} is corrupted: its sha256 is {h.hexdigest()}, the recorded one is {expected}; "
                         "nothing was written",
                         hint="build or pull the image again")


# ---- the target ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    path: Path
    is_block: bool
    size: int | None
    description: str
    # A block device is opened once, exclusively (O_EXCL: nothing can mount it or open
    # it exclusively meanwhile); every check, the copy and the ESP go through this
    # descriptor, never through the path again.
    fd: int | None = None
    rdev: int | None = None

    @property
    def io_path(self) -> str:
        """What helper programs (sfdisk, mtools) open: this descriptor, not the path."""
        return f"/dev/fd/{self.fd}" if self.fd is not None else str(self.path)

    def still_the_same(self) -> None:
        """Refuse if the path now names another device than the one checked and shown
        (a device node or a symlink swapped while the operator was asked)."""
        if self.fd is None:
            return
        assert self.rdev is not None   # set with fd (_check_block)
        try:
            now = os.stat(self.path).st_rdev
        except OSError as e:
            now = None
            why = e.strerror
        if now != self.rdev:
            raise FlashError(f"{self.path} no longer names the device that was checked "
                             f"({os.major(self.rdev)}:{os.minor(self.rdev)}"
                             f"{f', now {os.major(now)}:{os.minor(now)}' if now is not None else f', now: {why}'}); "
                             "nothing was written",
                             hint="something replaced the device node or link; check the device name and flash again")

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            object.__setattr__(self, "fd", None)


def _sysfs(dev: int) -> Path:
    return Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}").resolve()


def _whole_disk(dev: int) -> Path | None:
    p = _sysfs(dev)
    if not p.exists():
        return None
    return p.parent if (p / "partition").exists() else p


def _mounts() -> list[tuple[str, str]]:
    """(major:minor, mount point) of every mount this process can see."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        f = line.split()
        out.append((f[2], f[4]))
    return out


def _busy(disk: Path) -> list[str]:
    """Why the disk is in use: mounts of it or its partitions, swap, holders (LVM, RAID)."""
    nodes = {disk.name: (disk / "dev").read_text().strip()}
    for part in disk.iterdir():
        if (part / "partition").exists():
            nodes[part.name] = (part / "dev").read_text().strip()
    by_devno = {v: k for k, v in nodes.items()}
    reasons = [f"/dev/{by_devno[d]} is mounted on {mp}" for d, mp in _mounts() if d in by_devno]
    swaps = Path("/proc/swaps").read_text().splitlines()[1:] if Path("/proc/swaps").exists() else []
    reasons += [f"{s.split()[0]} is in use as swap" for s in swaps if Path(s.split()[0]).name in nodes]
    for name in nodes:
        holders = disk / "holders" if name == disk.name else disk / name / "holders"
        if holders.exists():
            reasons += [f"/dev/{name} is held by /dev/{h.name}" for h in holders.iterdir()]
    return reasons


def _system_disks() -> set[Path]:
    """The disks holding the running system: whatever backs /, /usr, /boot and /boot/efi."""
    disks = set()
    for devno, mp in _mounts():
        if mp in ("/", "/usr", "/boot", "/boot/efi", "/efi"):
            major, minor = (int(x) for x in devno.split(":"))
            if major == 0:
                continue  # overlay, tmpfs: not a disk
            disk = _whole_disk(os.makedev(major, minor))
            if disk is not None:
                disks.add(disk)
                disks |= {Path(s).resolve().parent if (Path(s) / "partition").exists() else Path(s).resolve()
                          for s in (disk / "slaves").glob("*")} if (disk / "slaves").exists() else set()
    return disks


def _describe(disk: Path) -> str:
    backing = disk / "loop" / "backing_file"
    if backing.exists():
        return f"loop device backed by {backing.read_text().strip()}"
    parts = [(disk / "device" / f).read_text().strip() for f in ("vendor", "model") if (disk / "device" / f).exists()]
    return " ".join(p for p in parts if p) or "unknown model"


def inspect_target(path: Path, allow_file: bool) -> Target:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if allow_file:
            return Target(path, False, None, "new image file")
        raise FlashError(f"{path} does not exist", hint="name a whole disk such as /dev/sdX, "
                         "or pass --to-file to write an image file") from None
    if stat.S_ISREG(st.st_mode):
        if not allow_file:
            raise FlashError(f"{path} is a regular file, not a block device; nothing was written",
                             hint="pass --to-file to write the image into a file")
        return Target(path, False, None, "image file (replaced)")
    if not stat.S_ISBLK(st.st_mode):
        raise FlashError(f"{path} is neither a block device nor a regular file; nothing was written")
    # The refusals by name first (they say why: mounted where, which partition); then the
    # device is opened once, exclusively, and everything is checked again on it.
    _refusals(path, st.st_rdev)
    try:
        fd = os.open(path, os.O_RDWR | os.O_EXCL | os.O_CLOEXEC)
    except OSError as e:
        raise FlashError(f"cannot open {path} exclusively: {e.strerror}; nothing was written",
                         hint="it is mounted or held by another program (unmount it), or run as root") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISBLK(st.st_mode):
            raise FlashError(f"{path} is not a block device any more; nothing was written")
        return _check_block(path, fd, st.st_rdev)
    except BaseException:
        os.close(fd)
        raise


def _check_block(path: Path, fd: int, rdev: int) -> Target:
    """Every refusal for the open device `fd` (its device number, never the path)."""
    sys = _refusals(path, rdev)
    size = os.lseek(fd, 0, os.SEEK_END)
    if size == 0:
        raise FlashError(f"{path} has no medium (size 0); nothing was written")
    return Target(path, True, size, f"{_describe(sys)}, {size / 1e9:.1f} GB", fd=fd, rdev=rdev)


def _refusals(path: Path, rdev: int) -> Path:
    """A partition, the running system's disk, a disk in use: refused. Returns its sysfs."""
    sys = _sysfs(rdev)
    if (sys / "partition").exists():
        raise FlashError(f"{path} is a partition of /dev/{sys.parent.name}; nothing was written",
                         hint=f"flash the whole disk: --device /dev/{sys.parent.name}")
    if sys in _system_disks():
        raise FlashError(f"{path} holds the running system; nothing was written",
                         hint="name the disk of the server to be flashed, not this machine's own")
    busy = _busy(sys)
    if busy:
        raise FlashError(f"{path} is in use ({'; '.join(busy)}); nothing was written",
                         hint="unmount it (and stop swap, LVM or RAID on it) first")
    return sys


# ---- writing and verifying ----------------------------------------------------------------
def _mismatched_ranges(fd: int, bmap: Bmap, copy_to: int | None = None) -> list[tuple[int, int, str]]:
    """The bmap ranges whose data read from `fd` does not match their checksum; with
    `copy_to`, every range read is also written there, at the same offset."""
    bad = []
    for rng in bmap.ranges:
        start, length = bmap.span(rng)
        h = hashlib.sha256()
        for off in range(start, start + length, CHUNK):
            data = os.pread(fd, min(CHUNK, start + length - off), off)
            h.update(data)
            if copy_to is not None:
                os.pwrite(copy_to, data, off)
        if h.hexdigest() != rng[2]:
            bad.append(rng)
    return bad


def write_image(image: Path, bmap: Bmap, target: Target, progress: Callable[[str], None]) -> None:
    """Copy the mapped blocks, then read them back from the medium and compare."""
    out = target.path
    if target.is_block:
        assert target.fd is not None
        target.still_the_same()
        dst = os.dup(target.fd)
    else:
        # A file is written beside the target and renamed: a failed flash leaves no half image.
        out = target.path.with_name(f".{target.path.name}.partial")
        out.unlink(missing_ok=True)
        try:
            dst = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as e:
            raise FlashError(f"cannot open {out} for writing: {e.strerror}; nothing was written",
                             hint="you lack the rights (run as root)") from None
    try:
        if not target.is_block:
            os.ftruncate(dst, bmap.image_size)
        src = os.open(image, os.O_RDONLY)
        try:
            progress(f"writing {bmap.mapped_bytes / 1e6:.0f} MB of data blocks to {target.path}")
            if _mismatched_ranges(src, bmap, copy_to=dst):
                raise FlashError(f"{image} changed while it was written; the target holds an incomplete image",
                                 hint="flash again")
        finally:
            os.close(src)
        os.fsync(dst)
        # Read back from the medium, not from the page cache that still holds what we wrote.
        if target.is_block:
            fcntl.ioctl(dst, BLKFLSBUF, 0)
        os.posix_fadvise(dst, 0, 0, os.POSIX_FADV_DONTNEED)
        progress(f"reading {target.path} back to verify")
        bad = [f"blocks {first}-{last}" for first, last, _ in _mismatched_ranges(dst, bmap)]
        if bad:
            raise FlashError(f"verification failed: {target.path} does not hold what was written "
                             f"({', '.join(bad[:5])}{' …' if len(bad) > 5 else ''})",
                             hint="the medium may be failing; try another disk")
    except BaseException:
        os.close(dst)
        if not target.is_block:
            out.unlink(missing_ok=True)
        raise
    os.close(dst)
    if not target.is_block:
        out.replace(target.path)


# ---- the node's identity on the ESP ------------------------------------------------------
def _fds(target: Path | str) -> tuple[int, ...]:
    m = re.fullmatch(r"/dev/fd/(\d+)", str(target))
    return (int(m.group(1)),) if m else ()


def esp_offset(target: Path | str) -> int:
    return esp_extent(target)[0]


def esp_extent(target: Path | str) -> tuple[int, int]:
    """(first byte, size) of the EFI system partition of `target` (an image, a written
    disk, or /dev/fd/N for a device this process holds open)."""
    r = subprocess.run(["sfdisk", "-J", str(target)], capture_output=True, text=True, pass_fds=_fds(target),
                       env={**os.environ, "PATH": HOST_PATH})
    if r.returncode != 0:
        raise FlashError(f"cannot read the partition table of {target}: {r.stderr.strip()}")
    table = json.loads(r.stdout)["partitiontable"]
    sector = table.get("sectorsize", 512)
    for p in table.get("partitions", []):
        if p.get("type", "").lower() == ESP_TYPE:
            return p["start"] * sector, p["size"] * sector
    raise FlashError(f"{target}: the image has no EFI system partition", hint="was it built by ./build.py build?")


def seal(name: str, value: bytes) -> bytes:
    """The credential as a *.cred file systemd-stub passes to the booted system.

    Credentials from the ESP count as untrusted and are imported only encrypted; the null
    key is the one every machine can open on first boot. The ESP is readable by anyone
    holding the disk, exactly like a credential on a USB stick: keep the disks like keys."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in", Path(tmp) / "out"
        src.write_bytes(value)
        # auto-initrd seals with the null key where the host has no TPM; a TPM would seal
        # to *this* machine, which the server could never open: checked below.
        r = subprocess.run(["systemd-creds", "encrypt", "--with-key=auto-initrd", f"--name={name}", str(src), str(dst)],
                           capture_output=True, text=True, env={**os.environ, "PATH": HOST_PATH})
        if r.returncode != 0:
            raise FlashError(f"systemd-creds could not seal credential {name}: {r.stderr.strip()}")
        data = dst.read_bytes()
    import base64
    if base64.b64decode(data)[:16] != NULL_KEY_ID:
        raise FlashError("systemd-creds sealed the credentials to this host's TPM, which the flashed server "
                         "cannot open", hint="flash from a machine without a TPM (or with it disabled)")
    return data


def write_credentials(target: Path | str, credentials: dict[str, bytes], progress: Callable[[str], None]) -> None:
    offset = esp_offset(target)
    img = f"{target}@@{offset}"
    fds = _fds(target)
    env = {**os.environ, "PATH": HOST_PATH, "MTOOLS_SKIP_CHECK": "1"}
    progress(f"writing {len(credentials)} credentials to the ESP (loader/credentials/)")
    with tempfile.TemporaryDirectory() as tmp:
        for d in ("::/loader", "::/loader/credentials"):
            subprocess.run(["mmd", "-D", "s", "-i", img, d], capture_output=True, env=env, pass_fds=fds)
        for name, value in sorted(credentials.items()):
            f = Path(tmp) / f"{name}.cred"
            f.write_bytes(seal(name, value))
            r = subprocess.run(["mcopy", "-o", "-i", img, str(f), f"::/loader/credentials/{f.name}"],
                               capture_output=True, text=True, env=env, pass_fds=fds)
            if r.returncode != 0:
                raise FlashError(f"cannot write {f.name} onto the ESP of {target}: {r.stderr.strip()}")
            back = Path(tmp) / "back"
            subprocess.run(["mcopy", "-o", "-i", img, f"::/loader/credentials/{f.name}", str(back)],
                           capture_output=True, env=env, check=False, pass_fds=fds)
            if not back.exists() or back.read_bytes() != f.read_bytes():
                raise FlashError(f"credential {f.name} did not read back from the ESP of {target}")
            back.unlink()
    os.sync()


def esp_credentials(target: Path) -> list[str]:
    """Names of the credentials on the target's ESP (for reports and tests)."""
    img = f"{target}@@{esp_offset(target)}"
    r = subprocess.run(["mdir", "-b", "-i", img, "::/loader/credentials"], capture_output=True, text=True,
                       env={**os.environ, "PATH": HOST_PATH, "MTOOLS_SKIP_CHECK": "1"})
    return sorted(re.sub(r"\.cred$", "", Path(l.strip()).name) for l in r.stdout.splitlines() if l.strip().endswith(".cred"))


def looks_like_reference(text: str) -> bool:
    """REGISTRY/REPO:TAG or REGISTRY/REPO@sha256:…, as opposed to a file name."""
    return bool(re.match(r"^[\w.-]+(:\d+)?/[\w./-]+([:@][\w.:-]+)$", text))
