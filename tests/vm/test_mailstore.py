"""The mailstore keeps every message, serves it over IMAP behind TLS, and never writes a
plaintext byte of mail to its disk: not in the lower directory, not anywhere on the
data partition. While it is down, mail waits on the filters. Without its key it stays
shut."""
from __future__ import annotations

import contextlib
import imaplib
import ssl

import pytest

from appliance.vm import subtest
from appliance.wait import Timeout, retry
from tests.vm.mail import (FILTERS, USERS, assert_damaged_file_set_aside, assert_locked, damage_a_queue_file, deliver,
                           imap_tokens, lower_fingerprint, new_tokens, queued, scan_disk, send_in_sessions, smtp_send,
                           supply_key, wait_backends, wait_degraded, wait_delivered, wait_in_mailboxes, wait_mail_up)

# One xdist group: guests of different modules never compete for the 2 cores.
pytestmark = [pytest.mark.vm, pytest.mark.xdist_group("vm")]

KEY = "mailcluster.mailstore-key"
LOWER = "/srv/mail/crypt"


@pytest.fixture(scope="module")
def cluster(mail_cluster):
    """The shared cluster, with store1's mailboxes emptied of earlier modules' mail so
    this module can count exactly."""
    c = mail_cluster
    wait_mail_up(c["store1"])
    c["filter1"].wait_for_unit("multi-user.target")
    c["store1"].succeed("doveadm expunge -A mailbox '*' all")
    return c


@pytest.fixture(scope="module")
def delivered(cluster):
    """200 distinct messages to several users, sent from a filter's address."""
    return deliver(cluster, 200)


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


@pytest.fixture(scope="module")
def cleanly_rebooted(cluster, delivered, tmp_path_factory):
    """store1 powered off through ACPI with 200 messages in it; while it is off, 100
    messages go in through the frontend and its raw data partition is scanned on the
    host; then it boots again, without its key: test_without_the_key_... gives it the
    key on the running node. One boot serves four tests (a mailstore's boot under
    emulation costs minutes of CPU)."""
    store = cluster["store1"]
    for name in FILTERS:
        cluster[name].wait_for_unit("postfix.service", timeout=600)
    wait_backends(cluster, {name: "UP" for name in FILTERS})
    # Postfix re-dates a deferred queue file at each retry: a quiet store first, so that
    # only the boot without the key could change the lower directory after this.
    wait_delivered(store)
    before = lower_fingerprint(store, LOWER)
    burst = new_tokens(100)
    # Where the filters' logs of this burst begin (other tests bounce mail on purpose).
    since = {n: cluster[n].succeed("date +%s").strip() for n in FILTERS}
    store.shutdown()  # QEMU flushes everything to the disk file on exit
    key = store.spec.credentials.pop(KEY)
    try:
        acked = send_in_sessions(cluster, burst, per_session=25)
        # (a scan of the queue can miss a message qmgr moves back meanwhile: until all are seen)
        try:
            spooled = retry(lambda last: {n: queued(cluster[n]) for n in FILTERS}, timeout=60, interval=2,
                            until=lambda counts: sum(counts.values()) >= len(burst))
        except Timeout as e:
            spooled = e.last
        # control: a file name on the partition, stored in plaintext ext4 metadata
        scan = scan_disk(store, tmp_path_factory.mktemp("raw"), [t for _, t in delivered], b"key-signature",
                         "mail-data")
    finally:
        store.start()
        store.spec.credentials[KEY] = key  # (for its later boots: this one has none)
    return {"scan": scan, "sent": burst, "acked": acked, "spooled": spooled, "since": since, "before": before,
            "key": key}


@contextlib.contextmanager
def _explained(store):
    """A failure here comes with what the node itself said about its mail store (the
    failure hook adds the serial console)."""
    try:
        yield
    except (AssertionError, TimeoutError) as e:
        e.add_note(store.journal("mailcluster-mailcrypt.service") + store.stuck())
        raise


def test_without_the_key_mail_services_stay_down_and_lower_is_untouched(cluster, cleanly_rebooted):
    """store1 booted without its key (the clean reboot's boot), then given a wrong one on
    the running node: Postfix and Dovecot stay down, their ports closed, the ciphertext
    as it was before the reboot. The right key, given the same way, brings mail back
    without a reboot (README: a locked node)."""
    store = cluster["store1"]
    locked = dict(lower=LOWER, before=cleanly_rebooted["before"], upper="/var/vmail",
                  services=("postfix.service", "dovecot.service"), ports=(25, 143, 587, 993))
    with subtest("booted without the key"), _explained(store):
        wait_degraded(store)
        assert_locked(store, "mailcluster-mailcrypt", "no eCryptfs key: credential mailcluster.mailstore-key "
                      "is missing", **locked)
    with subtest("a wrong key"), _explained(store):
        rc, out = supply_key(store, KEY, "0" * 64, "postfix.service", "dovecot.service")
        assert rc != 0, out
        assert_locked(store, "mailcluster-mailcrypt", "wrong eCryptfs key", **locked)
    with subtest("the right key, without a reboot"), _explained(store):
        rc, out = supply_key(store, KEY, cleanly_rebooted["key"], "postfix.service", "dovecot.service")
        assert rc == 0, out
        wait_mail_up(store)
        assert store.succeed("mountpoint /var/vmail").strip() == "/var/vmail is a mountpoint"


@pytest.fixture(scope="module")
def came_back(cluster, cleanly_rebooted):
    """store1 serving mail again after the clean reboot (the test above gave it its key;
    if it did not, a boot with the key)."""
    store = cluster["store1"]
    if store.execute("systemctl is-active -q postfix.service dovecot.service")[0] != 0:
        store.shutdown()
        store.start()
    wait_mail_up(store)
    return cleanly_rebooted


def test_no_plaintext_in_lower_directory_or_on_the_raw_partition(cluster, delivered, came_back):
    store = cluster["store1"]
    store.succeed("cat > /run/tokens <<'EOF'\n" + "\n".join(t for _, t in delivered) + "\nEOF")
    with subtest("every token is readable through the encrypted mount"):
        found = store.succeed("grep -rFaoh -f /run/tokens /var/vmail/mail | sort -u | wc -l")
        assert int(found) == len(delivered)
    with subtest("no token in any file of the lower directory"):
        assert store.succeed("{ grep -rFaoh -f /run/tokens /srv/mail/crypt || true; } | wc -l").strip() == "0"
        assert int(store.succeed("find /srv/mail/crypt -type f | wc -l")) > len(delivered)  # ciphertext is there
    with subtest("no token anywhere on the data partition, read as raw bytes while it was off"):
        found, control = came_back["scan"]
        assert control > 0, "the scan did not see the partition's plaintext metadata"
        assert found == set(), f"plaintext tokens on the raw data partition: {sorted(found)[:5]}"


def test_mail_survives_a_clean_reboot(cluster, secrets, delivered, came_back):
    store = cluster["store1"]
    before = {t for _, t in delivered}
    for user in USERS:  # (what came in while it was off may be arriving meanwhile)
        kept = [t for t in imap_tokens(store, secrets, user) if t in before]
        assert sorted(kept) == sorted(t for u, t in delivered if u == user), user


def test_mail_waits_on_the_filters_while_the_mailstore_is_down(cluster, came_back):
    sent, acked = came_back["sent"], came_back["acked"]
    assert acked == [t for _, t in sent]
    assert sum(came_back["spooled"].values()) == 100, came_back["spooled"]
    found = wait_in_mailboxes(cluster, acked, timeout=420)
    mine = [t for t in found if t in set(acked)]
    assert len(mine) == len(set(mine)) == 100, "a message was delivered twice"
    for n in FILTERS:
        log = cluster[n].succeed(f"journalctl -b --since @{came_back['since'][n]} --no-pager -o cat -u postfix")
        assert "status=bounced" not in log and "sender non-delivery notification" not in log, n
        assert queued(cluster[n]) == 0


def test_acknowledged_mail_survives_a_crash(cluster, secrets, site):
    store, flt = cluster["store1"], cluster["filter1"]
    # Mail from before is all delivered first (the filters may still be handing over what
    # they spooled): only this burst can be caught in the crash.
    for name in FILTERS:
        wait_delivered(cluster[name], timeout=420)
    wait_delivered(store)
    burst = new_tokens(30)
    acked = smtp_send(flt, str(site.node("store1").address), burst)
    assert acked, "the mailstore acknowledged nothing"
    damage_a_queue_file(store, "/var/vmail/postfix", LOWER)
    store.crash()
    store.start()
    wait_mail_up(store)
    wait_delivered(store)
    everything = [t for user in USERS for t in imap_tokens(store, secrets, user)]
    assert not set(acked) - set(everything), "acknowledged mail was lost in the crash"
    # A crash between Dovecot's (fsynced) LMTP 250 and Postfix removing its queue file
    # delivers that message again after the reboot: SMTP's at-least-once rule, duplicates
    # over loss. Only messages of this burst may repeat, and only as whole copies (every
    # copy was fetched in full above).
    repeated = {t for t in everything if everything.count(t) > 1}
    assert repeated <= set(acked), "mail from before the crash was duplicated"
    with subtest("the queue file the crash left unreadable, and only it, was set aside, and said so"):
        assert_damaged_file_set_aside(store, "/var/vmail/postfix", "mailcluster-mailcrypt")


def test_data_partition_takes_the_rest_of_the_disk(cluster, site):
    """The test disk is larger than the image: the mail partition (and its file system)
    must have grown into all of it at boot, as on a freshly flashed server."""
    store = cluster["store1"]
    part = store.succeed("basename $(readlink -f /dev/disk/by-partlabel/mail-data)").strip()
    disk = store.succeed(f"basename $(readlink -f /sys/class/block/{part}/..)").strip()
    start, size, disk_size = (int(store.succeed(f"cat /sys/class/block/{p}").strip())
                              for p in (f"{part}/start", f"{part}/size", f"{disk}/size"))
    assert disk_size - (start + size) < 2048 * 8, "unused space left behind the mail partition"
    built = int(site.image.data_size[:-1]) << {"M": 20, "G": 30, "T": 40}[site.image.data_size[-1]]
    assert size * 512 > built, "the mail partition did not grow"
    fs = int(store.succeed("df -B1 --output=size /srv/mail | tail -1").strip())
    assert fs > 0.95 * size * 512, f"file system {fs} bytes on a {size * 512}-byte partition"
