#!/usr/bin/env python3
"""Hardening, as numbers: for each role's image booted as a node of the example site,
systemd-analyze's exposure of every mail daemon and of the product's own units (Debian's
unit alone, and as the image runs it), Lynis's hardening index with the suggestions it
still makes, and testssl.sh's verdict on the filter's STARTTLS (25) and the mailstore's
IMAPS (993). The same measurements tests/vm/test_hardening.py holds to its thresholds."""
from __future__ import annotations

import concurrent.futures

import click

from common import example_cluster, log, report
from tests.vm.audit import (DAEMONS, OWN_UNITS, exposure, lynis, tls_scan, filter_smtp_tls_scan, tls_problems,
                            tls_summary, vendor_exposure)

NODES = {"frontend": "fe1", "filter": "filter1", "mailstore": "store1"}


def exposures(m, role: str) -> dict:
    out = {}
    for unit in DAEMONS[role]:
        m.wait_for_unit(unit, timeout=900)
        out[unit] = {"debian": vendor_exposure(m, unit), "image": exposure(m, unit)}
    for unit in OWN_UNITS[role]:
        out[unit] = {"image": exposure(m, unit)}
    return out


@click.command()
def main() -> None:
    with example_cluster(tuple(NODES), "bench-hardening-") as c:
        machines = c.boot(*NODES.values())
        for m in machines:
            m.wait_for_boot(timeout=900)
        results: dict = {role: {"exposure": exposures(c[name], role)} for role, name in NODES.items()}
        log("exposure measured; running Lynis on every node")
        with concurrent.futures.ThreadPoolExecutor(len(NODES)) as pool:
            audits = dict(zip(NODES, pool.map(lambda r: lynis(c[NODES[r]]), NODES)))
        for role, audit in audits.items():
            results[role]["lynis"] = audit
        log("Lynis done; testssl.sh on filter1:25 (STARTTLS, through a PROXY v2 relay) and store1:993")
        smtp = filter_smtp_tls_scan(c["filter1"])
        imaps = tls_scan(c["store1"].forward(993))
        results["tls"] = {"filter1:25 STARTTLS": {"summary": tls_summary(smtp), "problems": tls_problems(smtp)},
                          "store1:993": {"summary": tls_summary(imaps), "problems": tls_problems(imaps)}}
    lynis_line = ", ".join(f"{r} {results[r]['lynis']['hardening_index']}" for r in NODES)
    worst = max((v["image"], u) for r in NODES for u, v in results[r]["exposure"].items() if u in DAEMONS[r])
    tls_line = ", ".join(f"{k}: {len(v['problems'])} problems" for k, v in results["tls"].items())
    report("hardening", results,
           f"Lynis hardening index: {lynis_line}; worst mail daemon exposure {worst[0]} ({worst[1]}); {tls_line}")


if __name__ == "__main__":
    main()
