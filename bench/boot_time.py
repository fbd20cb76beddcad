#!/usr/bin/env python3
"""Figure 3: boot time under TCG: seconds from QEMU start to the SMTP banner (seen from inside the guest, on its cluster address) (filter, then
frontend with that filter up behind it) and to the IMAP greeting (mailstore), and
systemd-analyze's own split (firmware, loader, kernel, initrd, userspace) from inside.

    python3 bench/boot_time.py [--runs 3] [--role filter ...]

Boots the test-layer images (the release image plus the control agent that reads
systemd-analyze; nothing else differs), one guest at a time except that the filter keeps
running while the frontend boots, on a private switch like the tests."""
from __future__ import annotations

import re
import time

import click

from common import example_cluster, log, report, spread

# (postscreen greets with a multi-line "220-" first, then "220 ")
GREETING = {"filter": (25, "220"), "frontend": (25, "220"), "mailstore": (143, "* OK")}
# A filter's postscreen takes connections from HAProxy only: the PROXY header first.
HELLO = {"filter": "PROXY TCP4 {a} {a} 40000 25\\r\\n"}
NODES = (("filter", "filter1"), ("frontend", "fe1"), ("mailstore", "store1"))


def wait_greeting(m, address: str, port: int, prefix: str, hello: str = "", timeout: float = 900) -> None:
    """Poll from inside the guest (the firewall admits a filter's port 25 only from the
    frontends, so the host cannot see it) until address:port greets with `prefix`."""
    m.wait_started(timeout)
    m.wait_until_succeeds(
        f"timeout 30 bash -c 'exec 3<>/dev/tcp/{address}/{port}; printf \"{hello}\" >&3; IFS= read -r -t 25 line <&3; "
        f"[[ $line == \"{prefix}\"* ]]'", timeout=timeout)


UNITS = {"ms": 0.001, "s": 1.0, "min": 60.0, "us": 1e-6}


def seconds(text: str) -> float:
    return sum(float(n) * UNITS[u] for n, u in re.findall(r"([0-9.]+)(min|ms|us|s)\b", text))


def analyze(m) -> dict:
    m.succeed("timeout 600 systemctl is-system-running --wait || true", timeout=700)
    out = m.succeed("systemd-analyze time")
    # "Startup finished in 1.2s (firmware) + 300ms (loader) + 2.1s (kernel) + ... = 53.1s"
    parts = {name: seconds(val) for val, name in re.findall(r"((?:[0-9.]+(?:min|ms|us|s)\s*)+)\((\w+)\)", out)}
    parts["total"] = seconds(out.split("=", 1)[1].splitlines()[0]) if "=" in out else None
    return parts


@click.command()
@click.option("--runs", default=3, show_default=True)
@click.option("--role", "roles", multiple=True, type=click.Choice([r for r, _ in NODES]),
              help="Only these roles (default: all). The frontend needs the filter.")
def main(runs: int, roles: tuple[str, ...]) -> None:
    nodes = [(r, n) for r, n in NODES if not roles or r in roles]
    if "frontend" in roles and "filter" not in roles:
        raise click.UsageError("--role frontend needs --role filter: HAProxy relays the filter's banner")
    greeting: dict[str, list[float]] = {r: [] for r, _ in nodes}
    inside: dict[str, list[dict]] = {r: [] for r, _ in nodes}
    for run in range(runs):
        # A new cluster each run: new disks, so every run is a first boot.
        with example_cluster(tuple(r for r, _ in nodes), "bench-boot-") as c:
            for role, name in nodes:
                m = c.machine(c.site.node(name))
                port, prefix = GREETING[role]
                t0 = time.monotonic()
                m.start(wait=False)
                address = str(c.site.node(name).address)
                wait_greeting(m, address, port, prefix, HELLO.get(role, "").format(a=address))
                greeting[role].append(time.monotonic() - t0)
                inside[role].append(analyze(m))
                log(f"run {run + 1}: {name} greeted after {greeting[role][-1]:.1f} s; {inside[role][-1]}")
    results = {}
    for role, _ in nodes:
        keys = [k for k in inside[role][0] if inside[role][0][k] is not None]
        results[role] = {"greeting_seconds": spread(greeting[role]),
                         "systemd_analyze_seconds": {k: spread([r[k] for r in inside[role] if r.get(k) is not None])
                                                     for k in keys}}
    summary = "; ".join(f"{r}: {v['greeting_seconds']['median']:.0f} s to "
                        f"{'IMAP greeting' if r == 'mailstore' else 'SMTP banner'}" for r, v in results.items())
    report("boot-time", results, f"boot under TCG (median of {runs}): {summary}")


if __name__ == "__main__":
    main()
