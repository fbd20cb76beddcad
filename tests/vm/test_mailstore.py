"""The mailstore keeps every message, serves it over IMAP behind TLS, and never writes a
plaintext byte of mail to its disk: not in the lower directory, not anywhere on the
data partition. Without its key it stays shut."""
from __future__ import annotations

import imaplib
import json
import subprocess
import re
import secrets as pysecrets
import shlex
import ssl

import pytest

from appliance.vm import Machine, subtest
from tests.conftest import boot

# One xdist group: guests of different modules never compete for the 2 cores.
pytestmark = [pytest.mark.vm, pytest.mark.xdist_group("vm")]

USERS = ["alice@example.test", "bob@example.test", "carol@example.test"]
KEY = "mailcluster.mailstore-key"


@pytest.fixture(scope="module")
def cluster(make_cluster):
    c = make_cluster()
    boot(c, "filter1", "store1")
    wait_mail_up(c["store1"])
    return c


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


def _imap_tokens(m: Machine, secrets, user: str) -> list[str]:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # per-node self-signed
    with imaplib.IMAP4("127.0.0.1", m.forward(143), timeout=60) as imap:
        imap.starttls(ctx)
        imap.login(user, secrets.user_password(user))
        imap.select("INBOX", readonly=True)
        _, data = imap.search(None, "ALL")
        tokens = []
        for num in data[0].split():
            _, msg = imap.fetch(num, "(BODY.PEEK[TEXT])")
            text = msg[0][1].decode()
            tokens += re.findall(r"\btok[0-9a-f]{24}\b", text)
        return tokens


def new_tokens(n: int) -> list[tuple[str, str]]:
    return [(USERS[i % len(USERS)], f"tok{pysecrets.token_hex(12)}") for i in range(n)]


def wait_mail_up(store: Machine) -> None:
    for unit in ("mailcluster-mailcrypt.service", "dovecot.service", "postfix.service"):
        store.wait_for_unit(unit)
    store.wait_for_open_port(25)
    store.wait_for_open_port(143)


def wait_delivered(store: Machine) -> None:
    try:
        store.wait_until_succeeds("test -z \"$(postqueue -j)\"", timeout=300)
    except AssertionError as e:
        e.add_note("mail queue (with deferral reasons):\n" + store.execute("postqueue -p | tail -20")[1])
        raise


@pytest.fixture(scope="module")
def delivered(cluster, site):
    """200 distinct messages to several users, sent from a filter's address."""
    msgs = new_tokens(200)
    acked = smtp_send(cluster["filter1"], str(site.node("store1").address), msgs)
    assert acked == [t for _, t in msgs]
    wait_delivered(cluster["store1"])
    return msgs


def test_plaintext_login_refused_and_wrong_password_fails(cluster, secrets):
    store = cluster["store1"]
    with imaplib.IMAP4("127.0.0.1", store.forward(143), timeout=60) as imap:
        assert "LOGINDISABLED" in imap.capabilities  # no plaintext login before STARTTLS
        with pytest.raises(imaplib.IMAP4.error):
            imap.login(USERS[0], secrets.user_password(USERS[0]))
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with imaplib.IMAP4_SSL("127.0.0.1", store.forward(993), ssl_context=ctx, timeout=60) as imap:
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            imap.login(USERS[0], "not-" + secrets.user_password(USERS[0]))
        assert imap.login(USERS[0], secrets.user_password(USERS[0]))[0] == "OK"


def test_every_message_comes_back_exactly_once(cluster, secrets, delivered):
    for user in USERS:
        expected = sorted(t for u, t in delivered if u == user)
        assert sorted(imap_tokens(cluster["store1"], secrets, user)) == expected, user


def test_no_plaintext_in_lower_directory_or_on_the_raw_partition(cluster, delivered, tmp_path):
    store = cluster["store1"]
    store.succeed("cat > /run/tokens <<'EOF'\n" + "\n".join(t for _, t in delivered) + "\nEOF")
    with subtest("every token is readable through the encrypted mount"):
        found = store.succeed("grep -rFaoh -f /run/tokens /var/vmail/mail | sort -u | wc -l")
        assert int(found) == len(delivered)
    with subtest("no token in any file of the lower directory"):
        assert store.succeed("{ grep -rFaoh -f /run/tokens /srv/mail/crypt || true; } | wc -l").strip() == "0"
        assert int(store.succeed("find /srv/mail/crypt -type f | wc -l")) > len(delivered)  # ciphertext is there
    with subtest("no token anywhere on the data partition, read as raw bytes"):
        store.shutdown()  # QEMU flushes everything to the disk file on exit
        try:
            found, control = scan_data_partition(store, tmp_path, delivered)
        finally:
            store.start()
            wait_mail_up(store)
        assert control > 0, "the scan did not see the partition's plaintext metadata"
        assert found == set(), f"plaintext tokens on the raw data partition: {sorted(found)[:5]}"


def scan_data_partition(m: Machine, tmp_path, delivered) -> tuple[set[str], int]:
    """Read the stopped node's mail-data partition from its disk as raw bytes, on the host.
    Returns the message tokens found and the count of a control string (a file name on
    the partition, stored in plaintext ext4 metadata)."""
    raw = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(m.spec.disk), str(raw)], check=True)
    table = json.loads(subprocess.run(["sfdisk", "-J", str(raw)], capture_output=True, text=True, check=True).stdout)
    sector = table["partitiontable"].get("sectorsize", 512)
    part = next(p for p in table["partitiontable"]["partitions"] if p.get("name") == "mail-data")
    start, size = part["start"] * sector, part["size"] * sector
    wanted = {t.encode() for _, t in delivered}
    pattern = re.compile(rb"tok[0-9a-f]{24}")
    found: set[bytes] = set()
    control = 0
    chunk, overlap = 64 << 20, 64
    with open(raw, "rb") as fh:
        fh.seek(start)
        done = 0
        while done < size:
            data = fh.read(min(chunk + overlap, size - done))
            if not data:
                break
            found |= set(pattern.findall(data)) & wanted
            control += data.count(b"key-signature")
            done += chunk
            fh.seek(start + done)
    raw.unlink()
    return {f.decode() for f in found}, control


def test_mail_survives_a_clean_reboot(cluster, secrets, delivered):
    store = cluster["store1"]
    store.shutdown()
    store.start()
    wait_mail_up(store)
    for user in USERS:
        assert sorted(imap_tokens(store, secrets, user)) == sorted(t for u, t in delivered if u == user)


# Known failure, open in issue 4: after a hard power-off, a message that Dovecot had
# already indexed can read back one byte shorter than its indexed size through eCryptfs
# ("Cached message size larger than expected (636 > 635)") and the IMAP FETCH aborts.
# Whether it shows depends on where the crash lands, so the mark is not strict.
@pytest.mark.xfail(reason="eCryptfs file size not durable across a crash (issue 4)", strict=False)
def test_acknowledged_mail_survives_a_crash(cluster, secrets, site):
    store, flt = cluster["store1"], cluster["filter1"]
    burst = new_tokens(30)
    acked = smtp_send(flt, str(site.node("store1").address), burst)
    assert acked, "the mailstore acknowledged nothing"
    store.crash()
    store.start()
    wait_mail_up(store)
    wait_delivered(store)
    everything = [t for user in USERS for t in imap_tokens(store, secrets, user)]
    assert not set(acked) - set(everything), "acknowledged mail was lost in the crash"
    assert len(everything) == len(set(everything)), "a message was delivered twice"


def test_without_the_key_mail_services_stay_down_and_lower_is_untouched(cluster):
    store = cluster["store1"]
    fingerprint = "find /srv/mail/crypt -printf '%p %s %T@\\n' | sort | sha256sum"
    before = store.succeed(fingerprint)
    key = store.spec.credentials.pop(KEY)
    try:
        for case, creds, reason in [
            ("missing key", {}, "no eCryptfs key: credential mailcluster.mailstore-key is missing"),
            ("wrong key", {KEY: b"0" * 64}, "wrong eCryptfs key"),
        ]:
            with subtest(case):
                store.shutdown()
                store.spec.credentials.update(creds)
                store.start()
                store.execute("systemctl is-system-running --wait", timeout=300)
                for unit in ("postfix.service", "postfix@-.service", "dovecot.service"):
                    assert store.succeed(f"systemctl show -P ActiveState {unit}").strip() == "inactive", unit
                assert reason in store.succeed("journalctl -b -u mailcluster-mailcrypt --no-pager")
                assert store.succeed("ss -Htln '( sport = :25 or sport = :143 or sport = :993 )'").strip() == ""
                store.fail("mountpoint -q /var/vmail")
                assert store.succeed(fingerprint) == before
                store.spec.credentials.pop(KEY, None)
    finally:
        store.spec.credentials[KEY] = key
