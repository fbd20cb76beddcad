"""flash writes the disk it checked and showed, or nothing: the device is opened once and
every check, the copy and the ESP go through that descriptor; the image's partition
table is read before the first byte is written. Real loop devices, a small real GPT image."""
from __future__ import annotations

import hashlib
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance import flash
from tests.tools import ROOT, digest, loop_device

NODE = "fe1"  # a frontend: no role check needs a manifest for these images


def small_image(tmp_path: Path) -> Path:
    """A 64 MiB GPT disk image with an ESP (FAT) and a data partition, recorded in SHA256SUMS
    as build and pull record theirs."""
    img = tmp_path / "img" / "tiny.raw"
    img.parent.mkdir()
    with open(img, "wb") as fh:
        fh.truncate(64 << 20)
    subprocess.run(["sfdisk", "-q", str(img)], input="label: gpt\nsize=32M, type=uefi\ntype=linux\n",
                   text=True, check=True)
    start, size = flash.esp_extent(img)
    subprocess.run(["mkfs.vfat", "--offset", str(start // 512), str(img), str(size // 1024)],
                   capture_output=True, check=True)
    sha = hashlib.sha256(img.read_bytes()).hexdigest()
    (img.parent / "SHA256SUMS").write_text(f"{sha}  {img.name}\n")
    return img


def test_a_device_node_swapped_during_the_prompt_is_detected_and_nothing_is_written(tmp_path):
    image = small_image(tmp_path)
    with loop_device(tmp_path / "a", 128 << 20) as a, loop_device(tmp_path / "b", 128 << 20) as b:
        for dev in (a, b):
            with open(dev, "wb") as fh:
                fh.write(f"contents of {dev}".encode() * 1000)
        before = {a: digest(a), b: digest(b)}
        link = tmp_path / "server-disk"
        link.symlink_to(a)
        proc = subprocess.Popen([sys.executable, str(ROOT / "build.py"), "flash", str(image), "--device", str(link),
                                 "--node", NODE], stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdout=subprocess.PIPE, cwd=ROOT)
        try:
            said = b""
            deadline = time.monotonic() + 120
            while b"Everything on it is lost." not in said:
                assert time.monotonic() < deadline and proc.poll() is None, said.decode()
                if select.select([proc.stderr], [], [], 1)[0]:
                    said += os.read(proc.stderr.fileno(), 4096)
            assert f"loop device backed by {tmp_path / 'a'}".encode() in said
            # The operator is asked about disk a; meanwhile the name comes to mean disk b.
            tmp_link = tmp_path / "server-disk.new"
            tmp_link.symlink_to(b)
            tmp_link.replace(link)
            out, err = proc.communicate(b"y\n", timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
        err = (said + err).decode()
        assert proc.returncode == flash.FlashError.exit_code, err
        assert f"{link} no longer names the device that was checked" in err and "nothing was written" in err
        assert {a: digest(a), b: digest(b)} == before


def test_a_file_that_is_not_a_disk_image_is_refused_before_writing(tmp_path):
    fake = tmp_path / "img" / "fake.raw"
    fake.parent.mkdir()
    fake.write_bytes(os.urandom(4 << 20))
    (fake.parent / "SHA256SUMS").write_text(f"{hashlib.sha256(fake.read_bytes()).hexdigest()}  fake.raw\n")
    with loop_device(tmp_path / "disk", 64 << 20) as dev:
        with open(dev, "wb") as fh:
            fh.write(b"keep me" * 1000)
        before = digest(dev)
        r = subprocess.run([sys.executable, str(ROOT / "build.py"), "flash", str(fake), "--device", str(dev),
                            "--node", NODE, "--yes"], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert r.returncode == flash.FlashError.exit_code, r.stderr
        assert f"cannot read the partition table of {fake}" in r.stderr
        assert digest(dev) == before


def test_the_checked_device_is_the_one_written_and_its_esp_gets_the_credentials(tmp_path):
    image = small_image(tmp_path)
    with loop_device(tmp_path / "disk", 128 << 20) as dev:
        r = subprocess.run([sys.executable, str(ROOT / "build.py"), "flash", str(image), "--device", str(dev),
                            "--node", NODE, "--yes"], capture_output=True, text=True, cwd=ROOT, timeout=300,
                           env={**os.environ, "MAILCLUSTER_SECRETS": str(tmp_path / "secrets")})
        assert r.returncode == 0, r.stderr
        assert digest(dev, 1 << 20) == digest(image, 1 << 20)  # the GPT and the start of the ESP
        assert "mailcluster.node" in flash.esp_credentials(dev)


@pytest.mark.parametrize("node, key", [("store1", "mailcluster.mailstore-key"), ("filter1", "mailcluster.spool-key")])
def test_the_key_to_a_nodes_encrypted_store_stays_off_its_esp_unless_asked_for(tmp_path, node, key):
    """Whoever holds the disk reads its ESP: a mailstore's key to its mail and a filter's
    key to its queue go there only with --with-mailstore-key (evaluation)."""
    image = small_image(tmp_path)
    with loop_device(tmp_path / "disk", 128 << 20) as dev:
        for extra, written in (([], False), (["--with-mailstore-key"], True)):
            r = subprocess.run([sys.executable, str(ROOT / "build.py"), "flash", str(image), "--device", str(dev),
                                "--node", node, "--yes", *extra], capture_output=True, text=True, cwd=ROOT,
                               timeout=300, env={**os.environ, "MAILCLUSTER_SECRETS": str(tmp_path / "secrets")})
            assert r.returncode == 0, r.stderr
            on_esp = flash.esp_credentials(dev)
            assert "mailcluster.node" in on_esp and (key in on_esp) == written, (extra, on_esp)
            assert (f"note: {key} is not written to the disk" in r.stdout + r.stderr) != written
