#!/usr/bin/env python3
"""Figure 4: mail throughput end to end: messages per second from an SMTP load generator
through frontend -> filter -> mailstore until every message is in a mailbox, against the
same load delivered straight to the mailstore; and the ratio.

    python3 bench/throughput.py [--messages 1000] [--size 10240] [--sessions 4] [--rounds 3]

Boots fe1, filter1, filter2 and store1 of the example site (test images). The generator
(bench/mailload.py) runs inside filter2 for both paths, so both pay the same generator
cost: to the frontend's cluster address (HAProxy spreads sessions over both filters,
rspamd scans every message) and to store1 directly (filter2's address is one the
mailstore accepts mail from)."""
from __future__ import annotations

import time

import click

from common import example_cluster, log, report, spread
from mailload import send_script, sent_seconds
from tests.conftest import boot
from tests.vm.mail import USERS, wait_backends, wait_mail_up


def in_mailboxes(store) -> int:
    return int(store.succeed("doveadm search -A mailbox INBOX all | wc -l").strip())


def run(c, target: str, n: int, size: int, sessions: int) -> dict:
    store = c["store1"]
    store.succeed("doveadm expunge -A mailbox INBOX all")
    t0 = time.monotonic()
    out = c["filter2"].succeed(send_script("smtp", target, 25, n, size, USERS, sessions), timeout=7200)
    deadline = time.monotonic() + 3600
    while (have := in_mailboxes(store)) < n:
        if time.monotonic() > deadline:
            raise click.ClickException(f"only {have} of {n} messages arrived within an hour of sending")
        time.sleep(1)
    total = time.monotonic() - t0
    return {"seconds": total, "send_seconds": sent_seconds(out), "messages_per_second": n / total}


@click.command()
@click.option("--messages", default=1000, show_default=True)
@click.option("--size", default=10240, show_default=True, help="Message body size in bytes.")
@click.option("--sessions", default=4, show_default=True, help="Parallel SMTP sessions.")
@click.option("--rounds", default=3, show_default=True)
def main(messages: int, size: int, sessions: int, rounds: int) -> None:
    res: dict[str, list[dict]] = {}
    with example_cluster(("frontend", "filter", "mailstore"), "bench-throughput-") as c:
        paths_ = {"end_to_end": str(c.site.node("fe1").address), "direct": str(c.site.node("store1").address)}
        res.update({k: [] for k in paths_})
        boot(c, "fe1", "filter1", "filter2", "store1")
        wait_mail_up(c["store1"])
        for name in ("filter1", "filter2"):
            c[name].wait_for_unit("postfix.service", timeout=900)
            c[name].wait_for_unit("rspamd.service", timeout=900)
        wait_backends(c, {"filter1": "UP", "filter2": "UP"}, timeout=300)
        for r in range(rounds):
            for kind, target in paths_.items():
                res[kind].append(run(c, target, messages, size, sessions))
                log(f"round {r + 1} {kind}: {res[kind][-1]}")
    results = {"messages": messages, "message_bytes": size, "sessions": sessions,
               **{k: {"messages_per_second": spread([x["messages_per_second"] for x in v]),
                      "seconds": spread([x["seconds"] for x in v])} for k, v in res.items()}}
    e2e, direct = (results[k]["messages_per_second"]["median"] for k in ("end_to_end", "direct"))
    results["end_to_end_over_direct"] = round(e2e / direct, 3)
    report("throughput", results,
           f"throughput: {e2e:.1f} msg/s end to end, {direct:.1f} msg/s straight to the mailstore "
           f"(ratio {e2e / direct:.2f}; {messages} x {size} B, {sessions} sessions, median of {rounds})")


if __name__ == "__main__":
    main()
