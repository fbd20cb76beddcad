#!/usr/bin/env python3
"""Figure 7: wall time of README's test command in a fresh clone of this checkout's HEAD:
warm (the machine's shared build cache, as CI's clone on this machine has it) and cold
(MAILCLUSTER_CACHE pointing at an empty directory: every image built from nothing,
every package downloaded).

    python3 bench/suite_time.py [--warm-runs 1] [--cold-runs 1]

Each run takes the better part of an hour: two cores, TCG guests."""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import click

from common import ROOT, log, report, spread

LOGS = Path("/var/tmp/bench-suite-logs")


def test_command() -> str:
    text = (ROOT / "README.md").read_text()
    return re.search(r"<!-- test-command -->\s*```sh\n(.+)\n", text).group(1)


def one_run(cache: str | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-suite-", dir="/var/tmp") as tmp:
        clone = Path(tmp) / "clone"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        env = {**os.environ, "CI": "true"}
        if cache:
            env["MAILCLUSTER_CACHE"] = cache
        LOGS.mkdir(parents=True, exist_ok=True)
        logpath = LOGS / f"{'cold' if cache else 'warm'}-{time.strftime('%Y%m%dT%H%M%S')}.log"
        log(f"running the test command in {clone}; output in {logpath}")
        t = time.monotonic()
        with open(logpath, "w") as out:
            r = subprocess.run(["bash", "-c", test_command()], cwd=clone, env=env, stdout=out, stderr=subprocess.STDOUT)
        seconds = time.monotonic() - t
        tail = logpath.read_text().strip().splitlines()[-1:] or [""]
        return {"seconds": seconds, "exit": r.returncode, "outcome": tail[0], "log": str(logpath)}


@click.command()
@click.option("--warm-runs", default=1, show_default=True)
@click.option("--cold-runs", default=1, show_default=True)
def main(warm_runs: int, cold_runs: int) -> None:
    runs: dict[str, list[dict]] = {"warm": [], "cold": []}
    for _ in range(warm_runs):
        runs["warm"].append(one_run(None))
        log(f"warm: {runs['warm'][-1]}")
    for _ in range(cold_runs):
        with tempfile.TemporaryDirectory(prefix="bench-cold-cache-", dir="/var/tmp") as cache:
            runs["cold"].append(one_run(cache))
        log(f"cold: {runs['cold'][-1]}")
    results = {"command": test_command(),
               **{k: {"seconds": spread([r["seconds"] for r in v]), "runs": v} for k, v in runs.items() if v}}
    failed = [r for v in runs.values() for r in v if r["exit"]]
    report("suite-time", results,
           "test suite: " + ", ".join(f"{k} {v['seconds']['median'] / 60:.1f} min" for k, v in results.items()
                                      if k != "command")
           + (f" ({len(failed)} run(s) FAILED: {failed[0]['outcome']})" if failed else ""))


if __name__ == "__main__":
    main()
