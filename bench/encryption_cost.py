#!/usr/bin/env python3
"""Figure 5: what eCryptfs costs: LMTP delivery and mailbox read throughput on the
encrypted mail store against a plain directory on the same VM and the same disk.

    python3 bench/encryption_cost.py [--messages 300] [--rounds 3] [--size 10240]

On one mailstore VM (test image) a second Dovecot instance runs with the very same
configuration except mail_home, which points at /srv/mail/bench-plain (the same ext4 data
partition, unencrypted), and its LMTP port (2424). Each round delivers the same load to
both over LMTP, then reads every message back over IMAP after dropping the page cache,
then expunges. The read is IMAP itself: per user, Dovecot's imap process started in
PREAUTH mode (`imap -c CONF -u USER`, the way Dovecot documents running it by hand)
answers SELECT and `FETCH 1:* BODY.PEEK[]`, so both sides do the same protocol work
without TLS or a network in between, and pay the same start-up. The side that goes first
alternates from round to round. Reported as messages (or bytes) per second and
plain/encrypted."""
from __future__ import annotations

import click

from common import example_cluster, log, report, spread
from mailload import send_script, sent_seconds
from tests.vm.mail import USERS, wait_mail_up
MAIN = "/etc/dovecot/dovecot.conf"
PLAIN = "/run/bench/dovecot-plain.conf"
SIDES = (("encrypted", 24, MAIN), ("plain", 2424, PLAIN))  # (name, LMTP port, configuration)
SETUP = rf"""
set -e
install -d /run/bench
install -d -o vmail -g vmail /srv/mail/bench-plain
sed -e 's#^protocols = .*#protocols = lmtp#' \
    -e 's#^mail_home = .*#mail_home = /srv/mail/bench-plain/%{{user | domain}}/%{{user | username}}#' \
    -e 's#port = 24$#port = 2424#' -e 's#port = 12345$#port = 12346#' /etc/dovecot/dovecot.conf >{PLAIN}
printf 'base_dir = /run/dovecot-bench-plain\ninstance_name = bench-plain\n' >>{PLAIN}
dovecot -c {PLAIN}
for i in $(seq 60); do (exec 3<>/dev/tcp/127.0.0.1/2424) 2>/dev/null && exit 0; sleep 1; done
echo "the plain Dovecot instance did not open port 2424" >&2; exit 1
"""


def read_all(m, conf: str, expect: int) -> tuple[float, int]:
    """Seconds and bytes to FETCH every message of every user over IMAP, from a cold page
    cache. Fewer than `expect` bytes means the reads failed, not that they were fast."""
    # An earlier version read with one `doveadm fetch` per user and -c on the plain side
    # only: the configuration parse outweighed the reads and made plain look slower.
    imap = "printf 'a SELECT INBOX\\r\\nb FETCH 1:* BODY.PEEK[]\\r\\nc LOGOUT\\r\\n'"
    out = m.succeed(
        "sync; echo 3 >/proc/sys/vm/drop_caches; s=$(date +%s.%N); n=0; "
        f"for u in {' '.join(USERS)}; do b=$({imap} | /usr/lib/dovecot/imap -c {conf} -u $u | wc -c); n=$((n + b)); done; "
        "e=$(date +%s.%N); echo READ $n $(awk -v a=$s -v b=$e 'BEGIN { print b - a }')", timeout=3600)
    line = [x for x in out.splitlines() if x.startswith("READ ")][-1].split()
    if int(line[1]) < expect:
        raise click.ClickException(f"IMAP returned {line[1]} bytes for messages of {expect} bytes in all "
                                   f"({conf}); try the FETCH by hand on the guest")
    return float(line[2]), int(line[1])


@click.command()
@click.option("--messages", default=300, show_default=True, help="Messages per round and side.")
@click.option("--rounds", default=3, show_default=True)
@click.option("--size", default=10240, show_default=True, help="Message body size in bytes.")
def main(messages: int, rounds: int, size: int) -> None:
    rate = {"encrypted": [], "plain": []}
    read = {"encrypted": [], "plain": []}
    with example_cluster(("mailstore",), "bench-crypt-") as c:
        m = c.machine(c.site.node("store1"))
        m.start()
        wait_mail_up(m)
        m.succeed(SETUP)
        for r in range(rounds):
            for side, port, conf in (SIDES if r % 2 == 0 else SIDES[::-1]):
                secs = sent_seconds(m.succeed(send_script("lmtp", "127.0.0.1", port, messages, size, USERS),
                                              timeout=3600))
                rate[side].append(messages / secs)
                secs, nbytes = read_all(m, conf, messages * size)
                read[side].append(nbytes / secs)
                m.succeed(f"doveadm -c {conf} expunge -A mailbox INBOX all")
                log(f"round {r + 1} {side}: {rate[side][-1]:.1f} msg/s delivered, {read[side][-1] / 1e6:.2f} MB/s read")
    results = {
        "message_bytes": size, "messages_per_round": messages,
        "lmtp_messages_per_second": {k: spread(v) for k, v in rate.items()},
        "read_bytes_per_second": {k: spread(v) for k, v in read.items()},
    }
    results["plain_over_encrypted"] = {
        "delivery": round(results["lmtp_messages_per_second"]["plain"]["median"]
                          / results["lmtp_messages_per_second"]["encrypted"]["median"], 3),
        "read": round(results["read_bytes_per_second"]["plain"]["median"]
                      / results["read_bytes_per_second"]["encrypted"]["median"], 3),
    }
    d, rr = results["plain_over_encrypted"]["delivery"], results["plain_over_encrypted"]["read"]
    report("encryption-cost", results,
           f"eCryptfs cost: plain delivers {d:.2f}x and reads {rr:.2f}x as fast as the encrypted store "
           f"(median of {rounds} rounds of {messages} x {size} B)")


if __name__ == "__main__":
    main()
