#!/usr/bin/env python3
"""Figure 2: image size per role: apparent, allocated, compressed for publishing (zstd,
as a registry layer would carry it), and the ten largest installed packages.

    python3 bench/image_size.py [--site sites/example.yaml]

Measures the release images in images/SITE/ (./build.py build first)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import click

from common import ROOT, log, report

TARGET_MB = 600


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def compressed(path: Path) -> int:
    # -T0 over two cores; level 10 is what a release upload would reasonably use.
    out = subprocess.run(f"zstd -q -10 -T0 -c {path} | wc -c", shell=True, check=True,
                         capture_output=True, text=True).stdout
    return int(out)


ROOT_X86_64 = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"


def read_file(image: Path, path: str) -> str:
    """A file from the image's root partition, read through a read-only loop device with
    debugfs (no mount: the host kernel need not know the image's file systems' options)."""
    table = json.loads(subprocess.run(["sfdisk", "--json", str(image)], check=True, capture_output=True,
                                      text=True).stdout)["partitiontable"]
    root = next(p for p in table["partitions"] if p["type"].upper() == ROOT_X86_64)
    sector = table.get("sectorsize", 512)
    dev = subprocess.run(["losetup", "--find", "--show", "--read-only", "--offset", str(root["start"] * sector),
                          "--sizelimit", str(root["size"] * sector), str(image)],
                         check=True, capture_output=True, text=True).stdout.strip()
    try:
        return subprocess.run(["debugfs", "-R", f"cat {path}", dev], check=True, capture_output=True,
                              text=True).stdout
    finally:
        subprocess.run(["losetup", "--detach", dev], check=False)


def largest_packages(image: Path, n: int = 10) -> list[dict]:
    """Installed-Size of each package, read from the image's dpkg status (read-only)."""
    pkgs, cur = [], {}
    for line in read_file(image, "/var/lib/dpkg/status").splitlines() + [""]:
        if not line:
            if cur.get("Status", "").endswith(" installed") and "Installed-Size" in cur:
                pkgs.append({"name": cur["Package"], "installed_kib": int(cur["Installed-Size"])})
            cur = {}
        elif not line.startswith(" ") and ":" in line:
            k, v = line.split(":", 1)
            cur[k] = v.strip()
    return sorted(pkgs, key=lambda p: -p["installed_kib"])[:n] + [{"total_packages": len(pkgs),
                                                                 "total_installed_kib": sum(p["installed_kib"] for p in pkgs)}]


@click.command()
@click.option("--site", "site_name", default="example", show_default=True, help="Site name (images/SITE/).")
def main(site_name: str) -> None:
    from appliance.profiles import ProfileSet
    results = {}
    for role in ProfileSet.load().roles:
        image = ROOT / "images" / site_name / f"{role}.raw"
        if not image.exists():
            raise click.ClickException(f"{image}: not built; run ./build.py build {role}")
        log(f"{role}: measuring {image}")
        results[role] = {
            "apparent_mb": round(image.stat().st_size / 1e6, 1),
            "allocated_mb": round(allocated(image) / 1e6, 1),
            "zstd10_mb": round(compressed(image) / 1e6, 1),
            "largest_packages": largest_packages(image),
        }
    summary = "; ".join(f"{r}: {v['allocated_mb']:.0f} MB allocated, {v['zstd10_mb']:.0f} MB zstd"
                        f"{'' if v['allocated_mb'] < TARGET_MB else ' (over ' + str(TARGET_MB) + ' MB)'}"
                        for r, v in results.items())
    report("image-size", results, f"image size: {summary}")


if __name__ == "__main__":
    main()
