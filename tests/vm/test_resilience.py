"""Backups and fail-over: store1 pushes its eCryptfs ciphertext to store2 as dated,
hard-linked snapshots; when store1 is lost, store2 takes over with store1's key and
every acknowledged message is there. Half of the mail backed up first waits on the
filters while both mailstores are down: no disk, the backup's included, holds it in
plaintext (#20). Runs last on the shared cluster: it ends with store1 rebuilt and
restored from store2, and store2 shut down."""
from __future__ import annotations

import base64
import time

import pytest

from appliance.credentials import ssh_key
from appliance.vm import subtest
from tests.conftest import _live
from tests.vm.mail import (FILTERS, USERS, build_status, deliver, imap_tokens, mailbox_tokens, new_tokens, run_backup,
                           scan_disk, send, spool_while_mailstores_down, wait_in_mailboxes, wait_mail_up)

pytestmark = [pytest.mark.vm, pytest.mark.xdist_group("vm")]

SNAPSHOTS = "/srv/mail/backups/store1"
# systemd's id (the first 16 bytes of an encrypted credential) for a credential sealed
# with both the host key and the TPM (src/shared/creds-util.h).
SEALED_HOST_AND_TPM2 = bytes.fromhex("93a894094874449090caf2fc93cab553")


@pytest.fixture(scope="module")
def cluster(mail_cluster):
    c = mail_cluster
    wait_mail_up(c["store1"])
    c["store1"].succeed("doveadm expunge -A mailbox '*' all")
    return c


@pytest.fixture(scope="module")
def store2(cluster):
    # With a TPM, as a server would have: the takeover key is sealed to it.
    m = cluster.machine(cluster.site.node("store2"), tpm=True)
    _live.append(m)
    return m


def new_mail_lands_on(c, store: str) -> None:
    """Once both filters route to `store`, 3 messages sent through the frontend arrive there."""
    address = c.site.node(store).address
    for name in ("filter1", "filter2"):
        c[name].wait_until_succeeds(f"grep -qF 'relay:[{address}]' /etc/postfix/transport", timeout=120)
    later = new_tokens(3)
    assert send(c, later) == [t for _, t in later]
    wait_in_mailboxes(c, [t for _, t in later], store=store)


def test_a_wrong_pairing_secret_is_refused_and_nothing_is_sent(cluster, store2):
    store1 = cluster["store1"]
    # store1's pairing retries until store2 is up: held, so that the first attempt store2
    # sees is one with a secret that is not the pair's.
    store1.succeed("systemctl stop mailcluster-backup-pair.service")
    store2.start()
    wait_mail_up(store2)
    wrong = ssh_key("not the pair's secret")
    store1.succeed(f"install -m 0600 /dev/stdin /run/wrong-pairing-key <<'EOF'\n{wrong}EOF")
    # The pairing script as its unit runs it, with that secret as its credential.
    rc, out = store1.execute(
        "systemd-run --wait --collect --unit=pairing-wrong-secret -p After=network.target "
        "-p LoadCredential=mailcluster.pairing-key:/run/wrong-pairing-key -p ImportCredential=mailcluster.backup "
        "/usr/libexec/mailcluster/backup-pair", timeout=300)
    log = store1.succeed("journalctl --no-pager -o cat -u pairing-wrong-secret")
    assert rc != 0 and "status=3" in out, out + log
    assert "pairing with backup store2 (10.77.0.32) refused" in log and "pairing secret" in log, log
    store1.fail("test -e /var/lib/mailcluster/backup-key/id_ed25519.paired")
    rc, _ = store1.execute("systemctl start mailcluster-backup.service")
    assert rc != 0, "a backup ran without a pairing"
    assert "not paired with backup store2" in store1.journal("mailcluster-backup.service")
    # (store2 makes store1's account and its two empty directories when it boots)
    store2.wait_until_succeeds("test -d /var/lib/mailcluster/paired/store1 && id mcb-store1", timeout=300)
    # ... before its sshd admits anyone: a primary pairing at that moment would find no
    # account and be refused as if its secret were wrong.
    made = int(store2.succeed("systemctl show -P ExecMainExitTimestampMonotonic mailcluster-backup-accounts.service"))
    sshd = int(store2.succeed("systemctl show -P ExecMainStartTimestampMonotonic ssh.service"))
    assert 0 < made <= sshd, f"accounts made at {made} µs, sshd started at {sshd} µs"
    reached = store2.succeed("find /srv/mail/backups/store1 /var/lib/mailcluster/paired/store1 -mindepth 1")
    assert reached == "", f"something reached the backup: {reached}"


def test_backups_send_what_changed_as_hard_linked_ciphertext(cluster, store2, delivered_twice):
    _, _, (one, two), *_ = delivered_twice
    print(f"\nbackup of 100 messages: {one['bytes']} bytes in {one['files']} files; "
          f"after 50 more: {two['bytes']} bytes in {two['files']} files", flush=True)
    # eCryptfs stores each sdbox message as its own file (>= 12 KiB of ciphertext): the
    # second run sends the 50 new ones and the few index files that changed.
    assert 50 <= two["files"] <= 50 + 20, two
    assert two["bytes"] < one["bytes"] * 0.65, (one, two)
    snaps = store2.succeed(f"ls {SNAPSHOTS}").split()
    assert {one["snapshot"], two["snapshot"], "latest"} <= set(snaps), snaps
    assert store2.succeed(f"readlink {SNAPSHOTS}/latest").strip() == two["snapshot"]
    a, b = (f"{SNAPSHOTS}/{x['snapshot']}" for x in (one, two))
    # Every file of the first snapshot that the second holds unchanged is the same inode.
    verdicts = store2.succeed(
        f"cd {a} && find crypt -type f | while read -r f; do "
        f"if [ -f '{b}'/\"$f\" ] && cmp -s \"$f\" '{b}'/\"$f\"; then "
        f"if [ \"$f\" -ef '{b}'/\"$f\" ]; then echo linked; else echo copied; fi; fi; done | sort | uniq -c")
    counts = {w: int(n) for n, w in (line.split() for line in verdicts.splitlines())}
    assert counts.get("copied", 0) == 0 and counts.get("linked", 0) >= 100, counts
    # ciphertext only: names are eCryptfs-encrypted, and no file holds a message token
    assert store2.succeed(f"ls {a}/crypt | grep -cv '^ECRYPTFS_FNEK_ENCRYPTED' || true").strip() == "0"

    with subtest("store1's snapshots belong to an account of its own, which can write nowhere else"):
        owners = store2.succeed(f"stat -c %U {SNAPSHOTS} {b}/crypt /var/lib/mailcluster/paired/store1/key.pub")
        assert owners.split() == ["mcb-store1"] * 3, owners
        for attempt in ("ls /srv/mail/backups", "touch /srv/mail/backups/planted",
                        "touch /var/lib/mailcluster/paired/planted", "touch /srv/mail/restore/planted"):
            store2.fail(f"runuser -u mcb-store1 -- {attempt}")


def test_status_shows_each_backup_as_it_completes(cluster, store2, delivered_twice):
    """./build.py status, from the admin network: store1's last backup to store2, younger
    after the second run and with one more snapshot kept, as many as store2 holds."""
    _, _, (_, two), (before, after), _ = delivered_twice
    was, now = (s["nodes"]["store1"].get("backup") for s in (before, after))
    assert was and now and was["to"] == now["to"] == "store2", (before, after)
    assert now["age_seconds"] < was["age_seconds"], (was, now)
    assert 0 <= now["age_seconds"] <= time.time() - two["done"] + 60, now
    kept = [s for s in store2.succeed(f"ls {SNAPSHOTS}").split() if s != "latest"]
    assert now["snapshots"] == was["snapshots"] + 1 == len(kept), (was, now, kept)
    assert now["size_bytes"] > 0 and after["nodes"]["store2"]["up"] is True, after


@pytest.fixture(scope="module")
def delivered_twice(cluster, store2, tmp_path_factory):
    """100 messages, a backup, 50 more, another backup: (first, second, (backup runs),
    (status before and after the second run), (the spooled, their disk scans)). Half of the first
    100 waited on the filters while both mailstores were down (#20's spool, read on every
    disk but the backup's meanwhile). (Before the first backup: with Postfix restarted on
    store1 between the two, the second sent 25 files of unchanged content again.)"""
    store2.start()  # (already up after the wrong-secret test)
    wait_mail_up(store2)
    store1 = cluster["store1"]
    # The pairing unit itself, with the pair's secret.
    store1.succeed("systemctl reset-failed mailcluster-backup.service; systemctl start mailcluster-backup-pair.service")
    store1.wait_until_succeeds("test -e /var/lib/mailcluster/backup-key/id_ed25519.paired", timeout=300)
    spooled, scans = spool_while_mailstores_down(cluster, ("store1", "store2"), 50, tmp_path_factory.mktemp("scans"))
    first = spooled + deliver(cluster, 50)
    one = run_backup(cluster["store1"])
    second = deliver(cluster, 50)
    # ./build.py status before and after the second run (what an operator checks)
    before = build_status(cluster)[0]
    two = run_backup(cluster["store1"])
    two["done"] = time.time()
    return first, second, (one, two), (before, build_status(cluster)[0]), (spooled, scans)


def test_mail_waiting_on_the_filters_is_on_no_disk_in_plaintext(cluster, delivered_twice):
    """While both mailstores took no mail, 50 messages waited in the filters' queues:
    neither filter's disk, read raw on the host meanwhile, held a subject or body of
    them. Then every message arrived once, and no disk of the running cluster (frontend,
    filters, store1) held them in plaintext either. (The backup's disk: the last test.)"""
    *_, (spooled, scans) = delivered_twice
    assert {node for node, _ in scans} == {"fe1", *FILTERS, "store1"}, scans.keys()
    for (node, when), (found, control) in scans.items():
        assert control > 0, f"{node} ({when}): the scan read no file system"
        assert found == set(), f"{node} ({when}): {len(found)} of the messages are on its disk in plaintext"
    tokens = {t for _, t in spooled}
    assert sorted(t for t in mailbox_tokens(cluster) if t in tokens) == sorted(tokens)


def test_failover_to_the_backup_keeps_every_message(cluster, store2, delivered_twice, secrets):
    first, second, *_ = delivered_twice
    cluster["store1"].crash()
    key = secrets.mailstore_key("store1")
    out = store2.succeed(f"mailcluster-takeover store1 - <<'EOF'\n{key}\nEOF", timeout=900)
    assert "store2 now serves store1's users" in out, out
    with subtest("store1's key is kept sealed to store2's TPM, not only to a key on its disk"):
        assert "store1's key is kept sealed with this node's TPM and its host key" in out, out
        sealed = base64.b64decode(store2.succeed("cat /etc/credstore.encrypted/mailcluster.takeover-key"))
        assert sealed[:16] == SEALED_HOST_AND_TPM2, sealed[:16].hex()
        assert key.encode() not in sealed
    for user in USERS:
        expected = sorted(t for u, t in first + second if u == user)
        assert sorted(imap_tokens(store2, secrets, user)) == expected, user

    with subtest("new mail through the frontend lands on store2"):
        new_mail_lands_on(cluster, "store2")


def test_a_rebuilt_primary_is_restored_from_its_backup(cluster, store2, delivered_twice):
    """store1 comes back on a new disk with its old credentials; mailcluster-restore on
    store2 hands it every message store2 holds for it, mail goes to store1 again, store2
    returns to standby, and store1's backups carry on from what store2 handed back."""
    served = sorted(mailbox_tokens(cluster, "store2"))
    _, second, *_ = delivered_twice
    assert set(t for _, t in second) <= set(served), "store2 does not serve store1's mail: no fail-over to undo"
    store1 = cluster["store1"]
    store1.start(fresh=True)
    wait_mail_up(store1)
    # Rejoined, in either state: if store2's announcement of its takeover reaches the new
    # store1 before store1 announces itself, store1 rightly calls itself a standby.
    try:
        store2.wait_until_succeeds("grep -Eqx 'node store1 mailstore 10.77.0.31 (active|standby)' "
                                   "/var/lib/mailcluster/members", timeout=300)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{store1.journal('mailcluster-announce.service')}"
                             f"{store2.journal('mailcluster-members.service')}") from None
    snaps_before = store2.succeed(f"ls {SNAPSHOTS}").split()
    out = store2.succeed("mailcluster-restore store1", timeout=1200)
    assert "store1 serves its users again" in out and "store2 is back to standby" in out, out
    wait_mail_up(store1)
    assert sorted(mailbox_tokens(cluster, "store1")) == served

    with subtest("new mail through the frontend lands on store1 again"):
        new_mail_lands_on(cluster, "store1")

    with subtest("store2 is back to standby, with what it served kept as a snapshot"):
        store2.fail("test -e /etc/credstore.encrypted/mailcluster.takeover-key")
        assert store2.succeed("systemctl is-active mailcluster-mailcrypt.service dovecot.service").split() == ["active"] * 2
        assert mailbox_tokens(cluster, "store2") == []
        snaps_after = store2.succeed(f"ls {SNAPSHOTS}").split()
        assert len(set(snaps_after) - set(snaps_before)) == 1, (snaps_before, snaps_after)

    with subtest("store1's next backup sends only what changed since the hand-back"):
        store1.wait_until_succeeds("test -e /var/lib/mailcluster/backup-key/id_ed25519.paired", timeout=300)
        run = run_backup(cluster["store1"])
        assert run["files"] <= 3 + 20, run


def test_no_plaintext_anywhere_on_the_backups_disk(cluster, store2, delivered_twice, tmp_path):
    """Read store2's whole disk as raw bytes on the host: backups (the spooled 50
    among them), then a takeover that served the same mail over IMAP, and still no
    message token in plaintext."""
    first, second, (one, _), *_ = delivered_twice
    store2.shutdown()  # last test on the shared cluster: QEMU flushes the disk on exit
    found, control = scan_disk(store2, tmp_path, [t for _, t in first + second], one["snapshot"].encode())
    assert control > 0, "the scan did not see the backup's own snapshot names (ext4 metadata)"
    assert not found, f"{len(found)} message tokens in plaintext on store2's disk"
