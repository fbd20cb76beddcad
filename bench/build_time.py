#!/usr/bin/env python3
"""Figure 1: build time per role, as an operator runs it (./build.py build ROLE):
  - no-op: every role with nothing changed (served from the store by input hash);
  - warm: after one overlay file changed (a comment appended to a base overlay file,
    which every role contains), from the incremental mkosi cache;
  - cold: empty caches (MAILCLUSTER_CACHE pointing at a new directory: no packages, no
    incremental trees, no finished images), downloading from the Debian mirror.

    python3 bench/build_time.py [--runs 3] [--cold-runs 1]

The overlay file is restored afterwards; the checkout ends as it started."""
from __future__ import annotations

import os
import subprocess
import tempfile

import click

from common import ROOT, log, report, spread, timed

CHANGED = ROOT / "overlays/10-base/etc/ssh/sshd_config.d/10-mailcluster.conf"


def build(*roles: str, env: dict | None = None) -> None:
    r = subprocess.run([str(ROOT / "build.py"), "build", *roles], cwd=ROOT, env={**os.environ, **(env or {})},
                       capture_output=True, text=True)
    if r.returncode:
        raise click.ClickException(f"./build.py build {' '.join(roles)} failed:\n{r.stdout[-3000:]}{r.stderr[-3000:]}")


@click.command()
@click.option("--runs", default=3, show_default=True, help="Runs of the no-op and warm builds.")
@click.option("--cold-runs", default=1, show_default=True, help="Runs of the cold build (minutes each).")
def main(runs: int, cold_runs: int) -> None:
    from appliance.profiles import ProfileSet
    roles = ProfileSet.load().roles
    log("bringing every role up to date first")
    build(*roles)

    noop = [timed(lambda: build(*roles)) for _ in range(runs)]
    log(f"no-op: {noop}")

    warm: dict[str, list[float]] = {r: [] for r in roles}
    original = CHANGED.read_bytes()
    try:
        for i in range(runs):
            CHANGED.write_bytes(original + f"# bench/build_time.py change {i} {os.getpid()}\n".encode())
            for role in roles:
                warm[role].append(timed(lambda: build(role)))
                log(f"warm run {i + 1}, {role}: {warm[role][-1]:.1f} s")
    finally:
        CHANGED.write_bytes(original)
    build(*roles)  # back to the checkout's images (from the store)

    cold: dict[str, list[float]] = {r: [] for r in roles}
    for i in range(cold_runs):
        with tempfile.TemporaryDirectory(prefix="bench-cold-cache-", dir="/var/tmp") as cache:
            for role in roles:
                cold[role].append(timed(lambda: build(role, env={"MAILCLUSTER_CACHE": cache})))
                log(f"cold run {i + 1}, {role}: {cold[role][-1]:.1f} s")
    build(*roles)

    results = {"noop_all_roles_seconds": spread(noop),
               "warm_seconds": {r: spread(v) for r, v in warm.items()},
               "cold_seconds": {r: spread(v) for r, v in cold.items() if v}}
    summary = (f"build: no-op all roles {results['noop_all_roles_seconds']['median']:.1f} s; warm "
               + ", ".join(f"{r} {v['median']:.0f} s" for r, v in results["warm_seconds"].items())
               + ("; cold " + ", ".join(f"{r} {v['median']:.0f} s" for r, v in results["cold_seconds"].items())
                  if results["cold_seconds"] else ""))
    report("build-time", results, summary)


if __name__ == "__main__":
    main()
