"""Mail helpers shared by the VM tests: send over SMTP, read back over IMAP, wait for queues."""
from __future__ import annotations

import base64
import contextlib
import csv
import email.utils
import errno
import imaplib
import io
import json
import os
import re
import secrets as pysecrets
import shlex
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

from appliance import paths
from appliance.vm import Machine
from appliance.wait import Timeout, retry
from tests.conftest import _live

USERS = ["alice@example.test", "bob@example.test", "carol@example.test"]


def smtp_send(sender: Machine, server: str, messages: list[tuple[str, str]]) -> list[str]:
    """Send (recipient, token) messages over one SMTP session from `sender`; returns the
    tokens the server acknowledged with 250 after DATA."""
    script = [
        "exec 3<>/dev/tcp/%s/25" % server,
        r"""expect() { local line; while IFS= read -r -t 60 -u3 line; do line=${line%$'\r'};
              [[ $line == "$1-"* ]] && continue; [[ $line == "$1 "* ]] && return 0;
              echo "server said: $line" >&2; return 1; done; echo "no answer" >&2; return 1; }""",
        r"""say() { printf '%s\r\n' "$1" >&3; }""",
        "expect 220", "say 'EHLO filter1.example.test'", "expect 250",
    ]
    for rcpt, token in messages:
        body = (f"From: tester@example.org\r\nTo: {rcpt}\r\nSubject: message {token}\r\n"
                f"Message-ID: <{token}@example.org>\r\n\r\nunique body token {token}\r\n.")
        script += [
            "say 'MAIL FROM:<tester@example.org>'", "expect 250",
            f"say 'RCPT TO:<{rcpt}>'", "expect 250",
            "say DATA", "expect 354",
            f"printf '%s\\r\\n' {shlex.quote(body)} >&3",
            f"expect 250 && echo ACK {token}",
        ]
    script += ["say QUIT"]
    out = sender.succeed("\n".join(script), timeout=600)
    return [line.split()[1] for line in out.splitlines() if line.startswith("ACK ")]


def imap_tokens(m: Machine, secrets, user: str) -> list[str]:
    """Every message token in `user`'s INBOX, fetched over IMAP+STARTTLS from the host."""
    try:
        return _imap_tokens(m, secrets, user)
    except (imaplib.IMAP4.error, OSError) as e:
        e.add_note(m.execute("journalctl -b --no-pager -u dovecot | tail -25")[1])
        raise


@contextlib.contextmanager
def inbox(m: Machine, secrets, user: str) -> Iterator[tuple[imaplib.IMAP4, list[bytes]]]:
    """`user`'s INBOX over IMAP+STARTTLS from the host, read-only, and its message numbers."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # (the chain is checked by test_inbound.py)
    with imaplib.IMAP4("127.0.0.1", m.forward(143), timeout=60) as imap:
        imap.starttls(ctx)
        imap.login(user, secrets.user_password(user))
        imap.select("INBOX", readonly=True)
        _, data = imap.search(None, "ALL")
        yield imap, data[0].split()


def _imap_tokens(m: Machine, secrets, user: str) -> list[str]:
    with inbox(m, secrets, user) as (imap, numbers):
        tokens = []
        for num in numbers:
            _, msg = imap.fetch(num, "(BODY.PEEK[TEXT])")
            text = msg[0][1].decode()
            tokens += re.findall(r"\btok[0-9a-f]{24}\b", text)
        return tokens


def imap_messages(m: Machine, secrets, user: str) -> list[bytes]:
    """Every message in `user`'s INBOX, whole (RFC822, as IMAP serves it: CRLF)."""
    with inbox(m, secrets, user) as (imap, numbers):
        return [imap.fetch(num, "(BODY.PEEK[])")[1][0][1] for num in numbers]


def new_tokens(n: int) -> list[tuple[str, str]]:
    return [(USERS[i % len(USERS)], f"tok{pysecrets.token_hex(12)}") for i in range(n)]


def wait_mail_up(store: Machine) -> None:
    for unit in ("mailcluster-mailcrypt.service", "dovecot.service", "postfix.service"):
        store.wait_for_unit(unit)
    store.wait_for_open_port(25)
    store.wait_for_open_port(143)


def deliver(c, n: int, store: str = "store1") -> list[tuple[str, str]]:
    """n distinct messages to several users, sent straight to `store` from filter1's
    address; returns them once the store's queue is empty."""
    msgs = new_tokens(n)
    acked = smtp_send(c["filter1"], str(c.site.node(store).address), msgs)
    assert acked == [t for _, t in msgs]
    wait_delivered(c[store])
    return msgs


def data_ranges(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of each stretch of [start, end) in a sparse file that holds data.
    The holes between read as zeros, which hold no token: qemu-img writes a disk's
    unwritten space as holes, most of a 6 GiB disk, and a scan skips them."""
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos
                return
            raise
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole - data
        pos = hole


def scan_disk(m: Machine, tmp_path: Path, tokens: list[str], control: bytes,
              partition: str | None = None, live: bool = False) -> tuple[set[str], int]:
    """Read the stopped node's disk (or one partition of it, by label) as raw bytes on
    the host. Returns which message tokens it holds in plaintext, and how often
    `control` occurs: a string known to be there, proving the scan reads real data.
    `live`: the node runs; what it has written so far (after a sync) is read as it is."""
    raw = tmp_path / f"{m.name}.raw"
    if live:
        m.succeed("sync")
    subprocess.run(["qemu-img", "convert", *(["-U"] if live else []), "-O", "raw", str(m.spec.disk), str(raw)],
                   check=True)
    start, size = 0, raw.stat().st_size
    if partition:
        table = json.loads(subprocess.run(["sfdisk", "-J", str(raw)], capture_output=True, text=True,
                                          check=True).stdout)["partitiontable"]
        sector = table.get("sectorsize", 512)
        part = next(p for p in table["partitions"] if p.get("name") == partition)
        start, size = part["start"] * sector, part["size"] * sector
    try:
        return scan_raw(raw, start, size, tokens, control)
    finally:
        raw.unlink()


def scan_raw(raw: Path, start: int, size: int, tokens: list[str], control: bytes) -> tuple[set[str], int]:
    """Which of `tokens` the `size` bytes of file `raw` from `start` hold, and how often
    `control` occurs there (scan_disk)."""
    wanted = {t.encode() for t in tokens}
    pattern = re.compile(rb"tok[0-9a-f]{24}")
    found: set[bytes] = set()
    count = 0
    chunk, overlap = 64 << 20, 64  # the overlap catches a token split across two reads
    with open(raw, "rb") as fh:
        for at, length in data_ranges(fh.fileno(), start, start + size):
            done = 0
            while done < length:
                fh.seek(at + done)
                data = fh.read(min(chunk + overlap, length - done))
                found |= set(pattern.findall(data)) & wanted
                count += data.count(control, 0, chunk + len(control) - 1)  # (the next read counts the overlap)
                done += chunk
    return {f.decode() for f in found}, count


def run_backup(store: Machine) -> dict:
    """One run of mailcluster-backup.service on `store`, as its timer would start it: the
    snapshot it made on the backup, what rsync sent, and the seconds it took."""
    since = store.succeed("date +%s").strip()
    t = time.monotonic()
    rc, _ = store.execute("systemctl start mailcluster-backup.service", timeout=1800)
    seconds = time.monotonic() - t
    log = store.succeed(f"journalctl --no-pager -o cat -u mailcluster-backup.service --since @{since}")
    assert rc == 0, f"backup failed:\n{log}"
    snap = re.findall(r"snapshot (\S+) complete on ", log)
    sent = re.findall(r"Total bytes sent: ([0-9]+)", log)
    files = re.findall(r"Number of regular files transferred: ([0-9]+)", log)
    assert snap and sent and files, log
    return {"snapshot": snap[-1], "bytes": int(sent[-1]), "files": int(files[-1]), "seconds": seconds}


def wait_delivered(store: Machine, timeout: float = 300) -> None:
    """Until `store`'s Postfix queue is empty (a filter's too: the same queue check)."""
    try:
        store.wait_until_succeeds("test -z \"$(postqueue -j)\"", timeout=timeout)
    except AssertionError as e:
        e.add_note("mail queue (with deferral reasons):\n" + store.execute("postqueue -p | tail -20")[1])
        # Dovecot says "Internal error" over LMTP and the reason only in its own log.
        for unit in ("dovecot", "postfix"):
            e.add_note(f"{unit}'s warnings this boot:\n" + store.execute(
                f"journalctl -b --no-pager -o short-monotonic -u {unit} -p warning | tail -30")[1])
        raise


# ---- eCryptfs queues after a power cut --------------------------------------------------
def damage_a_queue_file(m: Machine, queue: str, lower: str) -> None:
    """What a power cut can leave behind (it did once in CI): a queue file whose eCryptfs
    header never reached the disk, so that every open of it fails with EIO. Made here for
    certain, for `m`'s next boot: a file in the active queue (qmgr reads that directory
    only when it starts), its header zeroed in the ciphertext under `lower` (which has the
    same inode number)."""
    f = f"{queue}/active/DEADBEEF"
    m.succeed(f"printf 'queue file' > {f} && chown postfix {f} && chmod 0700 {f} && sync && "
              f"c=$(find {lower} -xdev -inum $(stat -c %i {f})) && test -f \"$c\" && "
              "dd if=/dev/zero of=\"$c\" bs=8192 count=1 conv=notrunc status=none && sync")


def assert_damaged_file_set_aside(m: Machine, queue: str, unit: str) -> None:
    """After damage_a_queue_file and a boot: that file, and only it, is in Postfix's
    corrupt queue, still unreadable, and `unit` said so. Then deleted, as its operator
    would: later tests see a clean queue."""
    # (postfix check renames a queue file to match its inode number: the name is Postfix's)
    said = m.succeed(f"journalctl -b --no-pager -o cat -u {unit}")
    found = re.search(r"queue file active/([0-9A-F]+) cannot be read: .*; moved to (\S+) so that Postfix", said)
    assert found and found[2] == f"{queue}/corrupt/active_{found[1]}", said
    assert m.succeed(f"find {queue}/corrupt -type f") == found[2] + "\n"
    assert m.execute(f"head -c1 {found[2]}")[0] != 0  # (nothing else was done to it)
    m.succeed(f"rm {found[2]}")


# ---- eCryptfs stores without their key ------------------------------------------------
def lower_fingerprint(m: Machine, lower: str) -> str:
    """Every path, size and mtime under an eCryptfs store's ciphertext directory, hashed."""
    return m.succeed(f"find {shlex.quote(lower)} -printf '%p %s %T@\\n' | sort | sha256sum")


def wait_degraded(m: Machine) -> None:
    """Booted, with a refusal visible to the operator as a failed unit. (is-system-running
    exits 1 when degraded, so no pipe under the agent's pipefail.)"""
    m.wait_until_succeeds('s=$(systemctl is-system-running || true); echo "$s"; test "$s" = degraded', timeout=600)


def assert_locked(m: Machine, crypt_unit: str, reason: str, lower: str, before: str, upper: str,
                  services: tuple[str, ...], ports: tuple[int, ...]) -> None:
    """`m` refused its eCryptfs key: `crypt_unit`'s journal says `reason`, the `services`
    that need the store are down, their `ports` closed, nothing is mounted at `upper`, and
    the ciphertext in `lower` is as it was (`before`, from lower_fingerprint)."""
    said = m.succeed(f"journalctl -b --no-pager -u {crypt_unit}")
    assert reason in said, said
    for unit in services:
        # (a start refused for a failed dependency leaves the unit inactive, not failed)
        assert m.succeed(f"systemctl show -P ActiveState {unit}").strip() == "inactive", unit
    listening = " or ".join(f"sport = :{p}" for p in ports)
    assert m.succeed(f"ss -Htln '( {listening} )'").strip() == ""
    m.fail(f"mountpoint -q {upper}")
    assert lower_fingerprint(m, lower) == before


def supply_key(m: Machine, credential: str, key: str | bytes, *units: str) -> tuple[int, str]:
    """What an operator does on a node that booted without its key (README): the key into
    /run/credstore, memory only, where the crypt unit's ImportCredential= finds it, then
    start the `units` that need the store. Returns systemctl's exit code and output."""
    data = base64.b64encode(key if isinstance(key, bytes) else key.encode()).decode()
    return m.execute(f"umask 077 && install -d /run/credstore && base64 -d > /run/credstore/{credential} <<'EOF' "
                     f"&& systemctl start {' '.join(units)} 2>&1\n{data}\nEOF", timeout=600)


# ---- through the frontend ------------------------------------------------------------
FILTERS = ("filter1", "filter2")


def queued(m: Machine) -> int:
    """Messages in `m`'s Postfix queue, by queue ID: showq reads one queue directory after
    another, and lists a message that qmgr moves between two of them meanwhile twice
    (a burst just in: incoming -> active -> deferred)."""
    return len({json.loads(line)["queue_id"] for line in m.succeed("postqueue -j").splitlines() if line.strip()})


def queued_for(m: Machine, recipient: str) -> list[tuple[str, str]]:
    """(queue ID, why it waits) of each message in `m`'s Postfix queue for `recipient`."""
    out = []
    for line in m.succeed("postqueue -j").splitlines():
        entry = json.loads(line) if line.strip() else {}
        out += [(entry["queue_id"], r.get("delay_reason", "")) for r in entry.get("recipients", [])
                if r["address"] == recipient]
    return out


def backend_status(c, backend: str = "filters_25") -> dict[str, str]:
    """HAProxy's view of each server of `backend`, from the stats endpoint on the admin network."""
    fe = c["fe1"]
    addr = c.site.node("fe1").address
    out = fe.succeed(f"exec 3<>/dev/tcp/{addr}/8404; printf 'GET /stats;csv HTTP/1.0\\r\\n\\r\\n' >&3; cat <&3")
    body = out.split("\r\n\r\n", 1)[1].lstrip("# ")
    return {r["svname"]: r["status"].split()[0] for r in csv.DictReader(io.StringIO(body))
            if r["pxname"] == backend and r["svname"] not in ("FRONTEND", "BACKEND")}


def wait_backends(c, wanted: dict[str, str], timeout: float = 120, backend: str = "filters_25") -> dict[str, str]:
    """Until HAProxy reports each server of `wanted` in its state; returns what it reported."""
    try:
        return retry(lambda last: backend_status(c, backend), timeout=timeout, interval=2,
                     until=lambda seen: all(seen.get(k) == v for k, v in wanted.items()))
    except Timeout as e:
        raise AssertionError(f"HAProxy reports {e.last} in {backend}, expected {wanted}") from None


def wait_mail_flows(c, units: tuple[str, ...] = ("postfix.service",)) -> None:
    """Until mail flows end to end: store1 takes it, each filter runs `units`, and HAProxy
    has both filters UP."""
    wait_mail_up(c["store1"])
    for name in FILTERS:
        for unit in units:
            c[name].wait_for_unit(unit, timeout=600)  # rspamd loads its rules for minutes under TCG
    wait_backends(c, {name: "UP" for name in FILTERS})


def message(rcpt: str, token: str, extra: str = "", sender: str = "sender@example.org") -> str:
    return (f"From: {sender}\r\nTo: {rcpt}\r\nSubject: inbound {token}\r\n"
            f"Date: {email.utils.formatdate()}\r\n"
            f"Message-ID: <{token}@example.org>\r\n\r\nunique body token {token}\r\n{extra}")


def send(c, messages: list[tuple[str, str]], helo: str = "client.example.org",
         sender: str = "sender@example.org") -> list[str]:
    """One SMTP session from the host to the frontend's port 25; returns the tokens whose
    message the server answered with 250 after DATA (a refused one is left out)."""
    acked = []
    with smtplib.SMTP("127.0.0.1", c["fe1"].forward(25), local_hostname=helo, timeout=180) as s:
        s.ehlo()
        for rcpt, token in messages:
            replies = [s.mail(sender), s.rcpt(rcpt)]
            if [code for code, _ in replies] == [250, 250]:
                replies.append(s.data(message(rcpt, token, sender=sender).encode("ascii")))
            if replies[-1][0] == 250 and len(replies) == 3:
                acked.append(token)
            else:
                print(f"{token} not taken: the server answered {replies}")  # (shown with a failure)
                s.rset()
    return acked


def send_all(c, messages: list[tuple[str, bytes]], sender: str = "sender@example.org") -> None:
    """Each (recipient, message) from `sender`, in one SMTP session through the frontend's
    port 25 (its rate limit counts connections)."""
    with smtplib.SMTP("127.0.0.1", c["fe1"].forward(25), local_hostname="client.example.org", timeout=180) as s:
        for rcpt, data in messages:
            assert s.sendmail(sender, [rcpt], data) == {}


def spool_message(rcpt: str, tok: str) -> bytes:
    """A message whose subject and body carry `tok`, and nothing that Postfix logs does
    (the journal keeps envelope addresses and the Message-ID, which is random here)."""
    return (f"From: sender@example.org\r\nTo: {rcpt}\r\nSubject: spooled {tok}\r\n"
            f"Date: {email.utils.formatdate()}\r\n"
            f"Message-ID: <{new_tokens(1)[0][1][3:]}@example.org>\r\n\r\nspooled body {tok}\r\n").encode()


def spool_while_mailstores_down(c, stores: tuple[str, ...], n: int, tmp_path: Path) -> tuple[list, dict]:
    """n messages through the frontend while the `stores` take no mail: they wait in the
    filters' queues, where each filter's disk is read raw meanwhile. Then the stores come
    back, every message arrives, and the frontend's, the filters' and the first store's
    disks are read again. Returns the (recipient, token)s and, per scan, (node, when):
    (tokens found in plaintext, occurrences of a string every file system holds)."""
    msgs = [(USERS[i % len(USERS)], t) for i, (_, t) in enumerate(new_tokens(n))]
    tokens = [t for _, t in msgs]
    scans: dict[tuple[str, str], tuple[set[str], int]] = {}

    def scan(names, when: str) -> None:
        for name in names:
            scans[name, when] = scan_disk(c[name], tmp_path, tokens, b"mailcluster", live=True)

    for store in stores:
        c[store].succeed("systemctl stop postfix.service")
    try:
        send_all(c, [(rcpt, spool_message(rcpt, tok)) for rcpt, tok in msgs])
        waiting = retry(lambda last: {f: queued(c[f]) for f in FILTERS}, timeout=120, interval=2,
                        until=lambda q: sum(q.values()) == n)
        print("waiting on the filters:", waiting, flush=True)
        scan(FILTERS, "waiting")
    finally:
        for store in stores:
            c[store].succeed("systemctl start postfix.service")
    for f in FILTERS:
        c[f].succeed("postqueue -f")
    wait_in_mailboxes(c, tokens, store=stores[0])
    scan(("fe1", *FILTERS, stores[0]), "delivered")
    return msgs, scans


def send_in_sessions(c, messages, per_session: int) -> list[str]:
    acked = []
    for i in range(0, len(messages), per_session):
        acked += send(c, messages[i:i + per_session])
    return acked


def mailbox_tokens(c, store: str = "store1") -> list[str]:
    return [t for user in USERS for t in imap_tokens(c[store], c.secrets, user)]


def wait_in_mailboxes(c, tokens: list[str], timeout: float = 300, store: str = "store1") -> list[str]:
    """Poll `store`'s mailboxes until every token is there; returns everything found."""
    def found(last: bool) -> list[str]:
        tokens_now = mailbox_tokens(c, store)
        missing = set(tokens) - set(tokens_now)
        if last and missing:
            filters = [n for n, m in c.machines.items() if m.spec.image == c.images["filter"] and m.process.running]
            queues = "\n".join(f"{n}: " + c[n].execute("postqueue -p | tail -15")[1] for n in filters)
            raise AssertionError(f"{len(missing)} of {len(tokens)} messages never reached {store}'s mailboxes;"
                                 f" filter queues:\n{queues}")
        return tokens_now

    return retry(found, timeout=timeout, interval=5, until=lambda now: set(tokens) <= set(now))


def build_status(c) -> tuple[dict, int]:
    """./build.py status --json, run where an operator would: on the admin network (the
    test Internet's namespace). A node slowed by TCG gets longer than the default to answer."""
    out = c.internet.exec("sh", "-c", '"$0" "$1" status --json --timeout 20; echo "exit $?"', sys.executable,
                          str(paths.ROOT / "build.py")).stdout
    body, _, code = out.rstrip().rpartition("\n")
    return json.loads(body), int(code.removeprefix("exit "))


# ---- the operator changes the site ----------------------------------------------------
def reboot_with_new_credentials(cluster, *names: str, wait: bool = True) -> list:
    """The operator's rolling reboot after changing the site: each node powered off and
    booted again with the credentials the site gives now; returns the new machines,
    started (their boots overlap). wait=False: returns once QEMU runs (wait_started)."""
    new = []
    for name in names:
        gone, rebooted = cluster.reboot_with_new_credentials(name)
        _live.remove(gone)
        gone.close()
        _live.append(rebooted)
        new.append(rebooted)
    if wait:
        for m in new:
            m.wait_started()
    return new


def wait_acme_certificate(cluster, m) -> None:
    """Until `m` serves a certificate from the ACME CA for every name its credential asks
    for: installed, covering them all, and the renewal unit done (it reloads the daemons
    last; until then they may serve the old one). A node rebooted with more names keeps
    its old certificate until the renewal 15 s after boot replaces it."""
    covers = ("have=$(openssl x509 -in /var/lib/mailcluster/tls/cert.pem -noout -ext subjectAltName"
              " | grep -o 'DNS:[^, ]*' | cut -c5-) && missing=0 && "
              "for n in $(sed -n 3p /run/credentials/@system/mailcluster.acme); do "
              'grep -qxF "$n" <<<"$have" || missing=1; done && test "$missing" = 0')
    try:
        m.wait_until_succeeds("grep -qx acme /var/lib/mailcluster/tls/source && "
                              "systemctl show -P ActiveState mailcluster-acme@renew.service | grep -qx inactive && "
                              + covers, timeout=600)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{m.journal('mailcluster-acme@renew.service')}\n"
                             f"{cluster.internet.logs()}") from None


def https_get(port: int, host: str, path: str, ca) -> tuple[str, bytes, bytes]:
    """GET https://`host``path` on 127.0.0.1:`port`, the chain verified by `ca` for
    `host`: the status line, the body, and the certificate (DER)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=120) as raw, \
            ctx.wrap_socket(raw, server_hostname=host) as tls:
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        answer = b"".join(iter(lambda: tls.recv(65536), b""))
        der = tls.getpeercert(binary_form=True)
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0].decode(), body, der
