#!/usr/bin/env python3
"""Figure 6: backup cost: bytes sent and seconds for a first backup of N messages and for
incremental ones after M new messages each, and the disk used by K snapshots against one.

    python3 bench/backup.py [--first 500] [--more 50] [--snapshots 5] [--size 10240]

Boots store1 and store2 of the example site (test images), fills store1's mailboxes over
LMTP, and runs mailcluster-backup.service on store1 as its timer would."""
from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path

import click

from common import log, report, spread
from mailload import send_script, sent_seconds

USERS = ["alice@example.test", "bob@example.test", "carol@example.test"]


def backup_run(store1) -> dict:
    since = store1.succeed("date +%s").strip()
    t = time.monotonic()
    rc, _ = store1.execute("systemctl start mailcluster-backup.service", timeout=1800)
    seconds = time.monotonic() - t
    out = store1.succeed(f"journalctl --no-pager -o cat -u mailcluster-backup.service --since @{since}")
    if rc:
        raise click.ClickException(f"backup failed:\n{out}")
    return {"seconds": seconds, "bytes_sent": int(re.findall(r"Total bytes sent: ([0-9]+)", out)[-1]),
            "files": int(re.findall(r"Number of regular files transferred: ([0-9]+)", out)[-1])}


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
    from appliance import paths
    from appliance.credentials import Secrets
    from appliance.imagebuild import Builder
    from appliance.profiles import ProfileSet
    from appliance.site import load_site
    from appliance.vm import Cluster
    from tests.conftest import role_ports
    from tests.vm.mail import wait_mail_up

    profiles = ProfileSet.load()
    site = load_site(paths.EXAMPLE_SITE, profiles.roles)
    images = {"mailstore": Builder(profiles, site, log=log).build("mailstore", ("test",)).raw}
    with tempfile.TemporaryDirectory(prefix="bench-backup-") as tmp:
        c = Cluster(site, images, Path(tmp), forwards=lambda n: role_ports(profiles, site, n.role),
                    secrets=Secrets(Path(tmp) / "secrets"))
        try:
            store1, store2 = (c.machine(site.node(n)) for n in ("store1", "store2"))
            for m in (store1, store2):
                m.start(wait=False)
            for m in (store1, store2):
                m.wait_started()
                wait_mail_up(m)
            store1.wait_until_succeeds("test -e /var/lib/mailcluster/backup-key/id_ed25519.paired", timeout=600)
            log(f"delivering {first} messages of {size} bytes")
            fill(store1, first, size)
            store_bytes = du(store1, "/srv/mail/crypt")
            first_run = backup_run(store1)
            log(f"first backup: {first_run}")
            incremental = []
            for i in range(snapshots - 1):
                fill(store1, more, size)
                incremental.append(backup_run(store1))
                log(f"incremental backup {i + 1}: {incremental[-1]}")
            base = "/srv/mail/backups/store1"
            all_snaps = du(store2, base)  # du counts each hard-linked file once
            newest = du(store2, f"{base}/$(readlink {base}/latest)")
        finally:
            c.close()
    results = {
        "message_bytes": size, "first_messages": first, "more_messages_each": more,
        "store_ciphertext_bytes": store_bytes,
        "first_backup": first_run,
        "incremental_backup": {"seconds": spread([r["seconds"] for r in incremental]),
                               "bytes_sent": spread([r["bytes_sent"] for r in incremental]),
                               "files": spread([r["files"] for r in incremental])},
        "disk": {"snapshots": snapshots, "all_snapshots_bytes": all_snaps, "newest_snapshot_bytes": newest,
                 "ratio": round(all_snaps / newest, 3)},
    }
    inc = results["incremental_backup"]
    report("backup", results,
           f"backup: first {first} msgs {first_run['bytes_sent'] / 1e6:.1f} MB in {first_run['seconds']:.0f} s; "
           f"+{more} msgs {inc['bytes_sent']['median'] / 1e6:.2f} MB in {inc['seconds']['median']:.0f} s (median of "
           f"{len(incremental)}); {snapshots} snapshots use {results['disk']['ratio']:.2f}x one")


if __name__ == "__main__":
    main()
