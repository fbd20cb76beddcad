"""Shared by the benchmark scripts: the machine they ran on, repeated runs, the report.

Every script prints one JSON document on stdout and then one summary line; BENCHMARKS.md
records both with the command that produced them."""
from __future__ import annotations

import json
import os
import platform
import signal
import statistics
import sys
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


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)
