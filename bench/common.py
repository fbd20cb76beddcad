"""Shared by the benchmark scripts: the machine they ran on, repeated runs, the report.

Every script prints one JSON document on stdout and then one summary line; BENCHMARKS.md
records both with the command that produced them."""
from __future__ import annotations

import json
import os
import platform
import signal
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# A stopped benchmark still powers off its guests (the scripts' finally blocks run).
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def machine() -> dict:
    mem_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:"))
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    from appliance import qemu
    return {"cores": os.cpu_count(), "ram_gib": round(mem_kib / 2**20, 1), "cpu": cpu,
            # The launcher always uses software emulation (no working KVM on these machines).
            "accel": "tcg" if "tcg" in " ".join(qemu.ACCEL) else " ".join(qemu.ACCEL),
            "kernel": platform.release()}


def spread(values: list[float]) -> dict:
    """Median and spread (min, max) of several runs."""
    return {"runs": len(values), "median": round(statistics.median(values), 3),
            "min": round(min(values), 3), "max": round(max(values), 3), "values": [round(v, 3) for v in values]}


def timed(fn: Callable[[], object]) -> float:
    t = time.monotonic()
    fn()
    return time.monotonic() - t


def report(figure: str, results: dict, summary: str) -> None:
    print(json.dumps({"figure": figure, "machine": machine(), "command": " ".join(["python3", *sys.argv]),
                      "results": results}, indent=2))
    print(summary, flush=True)


@contextlib.contextmanager
def example_cluster(roles: tuple[str, ...], prefix: str):
    """The example site's nodes on a private switch of their own, booting ROLES'
    test-layer images (built, or reused by input hash) as the VM tests do; every guest is
    powered off at the end, however the benchmark ends."""
    from appliance import paths
    from appliance.credentials import Secrets
    from appliance.imagebuild import Builder
    from appliance.profiles import ProfileSet
    from appliance.site import load_site
    from appliance.vm import Cluster
    from appliance.plan import Plan

    profiles = ProfileSet.load()
    site = load_site(paths.EXAMPLE_SITE, profiles.roles)
    builder = Builder(profiles, site, log=log)
    plans = {r: Plan.of(profiles, site, r, ("test",)) for r in site.roles}
    images = {r: builder.build(r, ("test",)).raw for r in roles}
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        c = Cluster(site, images, Path(tmp), plans=plans,
                    secrets=Secrets(Path(tmp) / "secrets"))
        try:
            yield c
        finally:
            c.close()


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)
