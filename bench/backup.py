#!/usr/bin/env python3
"""Figure 6: backup cost: bytes sent and seconds for a first backup of N messages and for
incremental ones after M new messages each, and the disk used by K snapshots against one.

    python3 bench/backup.py [--first 500] [--more 50] [--snapshots 5] [--size 10240]

Boots store1 and store2 of the example site (test images), fills store1's mailboxes over
LMTP, and runs mailcluster-backup.service on store1 as its timer would."""
from __future__ import annotations

import click

from common import example_cluster, log, report, spread
from mailload import send_script, sent_seconds
from tests.conftest import boot
from tests.vm.mail import USERS, run_backup, wait_mail_up


def fill(store1, n: int, size: int) -> float:
    out = store1.succeed(send_script("lmtp", "127.0.0.1", 24, n, size, USERS, sessions=2), timeout=3600)
    return sent_seconds(out)


def du(m, path: str) -> int:
    return int(m.succeed(f"du -s --block-size=1 {path}").split()[0])


@click.command()
@click.option("--first", default=500, show_default=True, help="Messages before the first backup.")
@click.option("--more", default=50, show_default=True, help="New messages before each incremental backup.")
@click.option("--snapshots", default=5, show_default=True, help="Snapshots in all (first + incremental).")
@click.option("--size", default=10240, show_default=True, help="Message body size in bytes.")
def main(first: int, more: int, snapshots: int, size: int) -> None:
    with example_cluster(("mailstore",), "bench-backup-") as c:
        store1, store2 = boot(c, "store1", "store2")
        for m in (store1, store2):
            wait_mail_up(m)
        store1.wait_until_succeeds("test -e /var/lib/mailcluster/backup-key/id_ed25519.paired", timeout=600)
        log(f"delivering {first} messages of {size} bytes")
        fill(store1, first, size)
        store_bytes = du(store1, "/srv/mail/crypt")
        first_run = run_backup(store1)
        log(f"first backup: {first_run}")
        incremental = []
        for i in range(snapshots - 1):
            fill(store1, more, size)
            incremental.append(run_backup(store1))
            log(f"incremental backup {i + 1}: {incremental[-1]}")
        base = "/srv/mail/backups/store1"
        all_snaps = du(store2, base)  # du counts each hard-linked file once
        newest = du(store2, f"{base}/$(readlink {base}/latest)")
    results = {
        "message_bytes": size, "first_messages": first, "more_messages_each": more,
        "store_ciphertext_bytes": store_bytes,
        "first_backup": first_run,
        "incremental_backup": {"seconds": spread([r["seconds"] for r in incremental]),
                               "bytes": spread([r["bytes"] for r in incremental]),
                               "files": spread([r["files"] for r in incremental])},
        "disk": {"snapshots": snapshots, "all_snapshots_bytes": all_snaps, "newest_snapshot_bytes": newest,
                 "ratio": round(all_snaps / newest, 3)},
    }
    inc = results["incremental_backup"]
    report("backup", results,
           f"backup: first {first} msgs {first_run['bytes'] / 1e6:.1f} MB in {first_run['seconds']:.0f} s; "
           f"+{more} msgs {inc['bytes']['median'] / 1e6:.2f} MB in {inc['seconds']['median']:.0f} s (median of "
           f"{len(incremental)}); {snapshots} snapshots use {results['disk']['ratio']:.2f}x one")


if __name__ == "__main__":
    main()
