"""OpenPGP at rest (#20): mail to a user who gave the site a certificate is stored
PGP/MIME-encrypted to it. What a user fetches over IMAP is decrypted on the host by GnuPG,
an independent implementation, with the user's secret key, which never left the host.
The frontends publish the certificates in a Web Key Directory, and mail that waits on a
filter is on its disk only as ciphertext."""
from __future__ import annotations

import email
import email.utils
import smtplib

import pytest

from appliance.openpgp import wkd_hash
from appliance.site import Acme, Tls, Wkd
from appliance.wait import Timeout, retry
from tests import internet, tools
from tests.tools import gpg, openpgp_key, pgp_mime_decrypt, pgp_mime_signed, pgp_mime_verify
from tests.vm.mail import (FILTERS, USERS, https_get, imap_messages, mailbox_tokens, message, new_tokens, queued, queued_for,
                           reboot_with_new_credentials, scan_disk, send, wait_acme_certificate, wait_backends,
                           wait_delivered, wait_in_mailboxes, wait_mail_flows)

pytestmark = [pytest.mark.vm, pytest.mark.xdist_group("vm")]

SENDER = "sender@example.org"


@pytest.fixture(scope="module")
def cluster(mail_cluster):
    wait_mail_flows(mail_cluster)
    return mail_cluster


@pytest.fixture(scope="module")
def sender_key(tmp_path_factory):
    """A correspondent's GnuPG home: its own key, for signing."""
    home = tmp_path_factory.mktemp("gnupg") / "sender"
    openpgp_key(home, SENDER)
    return home


def token() -> str:
    return new_tokens(1)[0][1]


def send_raw(c, rcpt: str, data: bytes) -> None:
    """`data` as one message from SENDER to `rcpt`, through the frontend's port 25."""
    send_all(c, [(rcpt, data)])


def send_all(c, messages: list[tuple[str, bytes]]) -> None:
    """Each (recipient, message) from SENDER, in one SMTP session through the frontend's
    port 25 (its rate limit counts connections)."""
    with smtplib.SMTP("127.0.0.1", c["fe1"].forward(25), local_hostname="client.example.org", timeout=180) as s:
        for rcpt, data in messages:
            assert s.sendmail(SENDER, [rcpt], data) == {}


def stored(c, user: str, tok: str, timeout: float = 300) -> bytes:
    """The message of `user`'s INBOX whose header carries `tok`, once it is there."""
    def find(last: bool) -> list[bytes]:
        found = [m for m in imap_messages(c["store1"], c.secrets, user) if tok.encode() in m.split(b"\r\n\r\n")[0]]
        if last and not found:
            raise AssertionError(f"{tok} never reached {user}'s mailbox; store1's queue:\n"
                                 + c["store1"].execute("postqueue -p | tail -20")[1])
        return found

    found = retry(find, timeout=timeout, interval=5, until=bool)
    assert len(found) == 1, f"{tok} is stored {len(found)} times"
    return found[0]


def body(msg: bytes) -> bytes:
    return msg.replace(b"\r\n", b"\n").split(b"\n\n", 1)[1]


def fields(msg: bytes) -> list[bytes]:
    return msg.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].split(b"\n")


def test_a_message_is_stored_as_pgp_mime_that_decrypts_to_what_was_sent(cluster, openpgp_user):
    user, home = openpgp_user
    tok = token()
    sent = message(user, tok, sender=SENDER).encode()
    send_raw(cluster, user, sent)
    raw = stored(cluster, user, tok)
    assert tok.encode() not in body(raw), "the body is stored in plaintext"
    inside = pgp_mime_decrypt(home, raw)
    # Inside: the message as sent, byte for byte (line ends as stored), below the trace
    # fields the cluster added on its way (Received, the filter's verdict).
    assert body(inside) == body(sent)
    original = fields(sent)
    assert [f for f in fields(inside) if f in original] == original, fields(inside)
    # Outside: what a client lists and searches by; the content's own type only inside.
    outer = email.message_from_bytes(raw)
    assert outer["Subject"] == f"inbound {tok}" and outer["From"] == SENDER
    assert outer.get_content_type() == "multipart/encrypted"


def test_a_signed_message_still_verifies_after_decryption(cluster, openpgp_user, sender_key):
    user, home = openpgp_user
    tok = token()
    send_raw(cluster, user, pgp_mime_signed(sender_key, SENDER, user, tok))
    inside = pgp_mime_decrypt(home, stored(cluster, user, tok))
    status = pgp_mime_verify(sender_key, inside)
    assert "[GNUPG:] GOODSIG" in status, status


def test_an_encrypted_message_is_stored_as_it_came(cluster, openpgp_user, sender_key):
    user, home = openpgp_user
    tok = token()
    cert = home / f"{user}.asc"
    armored = gpg(sender_key, "--armor", "--encrypt", "--trust-model", "always", "--recipient-file", str(cert),
                  input=f"Content-Type: text/plain\r\n\r\nsecret {tok}\r\n".encode()).stdout
    b = f"enc-{tok}"
    sent = (f"From: {SENDER}\r\nTo: {user}\r\nSubject: encrypted {tok}\r\nMIME-Version: 1.0\r\n"
            f'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; boundary="{b}"\r\n\r\n'
            f"--{b}\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n\r\n"
            f"--{b}\r\nContent-Type: application/octet-stream\r\n\r\n").encode() \
        + armored.replace(b"\n", b"\r\n") + f"\r\n--{b}--\r\n".encode()
    send_raw(cluster, user, sent)
    raw = stored(cluster, user, tok)
    assert body(raw) == body(sent)  # not wrapped a second time
    assert f"secret {tok}".encode() in pgp_mime_decrypt(home, raw)


def test_a_user_without_a_certificate_gets_plaintext(cluster):
    user, tok = "alice@example.test", token()
    sent = message(user, tok, sender=SENDER).encode()
    send_raw(cluster, user, sent)
    raw = stored(cluster, user, tok)
    assert body(raw) == body(sent)
    assert email.message_from_bytes(raw).get_content_type() == "text/plain"


def test_with_the_step_broken_mail_waits_in_the_queue_then_arrives_encrypted(cluster, openpgp_user):
    """The user's certificate unreadable to the step: the message stays queued (4xx, on the
    encrypted mount) and nothing of it is stored; repaired, it arrives encrypted."""
    user, home = openpgp_user
    store = cluster["store1"]
    cert = f"/run/mailcluster/openpgp/{user}.asc"
    tok = token()
    sent = message(user, tok, sender=SENDER).encode()
    store.succeed(f"chmod 0000 {cert}")
    try:
        send_raw(cluster, user, sent)
        try:
            waiting = retry(lambda last: queued_for(store, user), timeout=300, interval=3,
                            until=lambda q: any(reason for _, reason in q))
        except Timeout as e:
            raise AssertionError(f"never deferred on store1: {e.last}; filters' queues: "
                                 + " ".join(cluster[n].execute("postqueue -p | tail -5")[1] for n in FILTERS)) from None
        print("deferred:", waiting)
        assert len(waiting) == 1
        assert not [m for m in imap_messages(store, cluster.secrets, user) if tok.encode() in m]
    finally:
        store.succeed(f"chmod 0640 {cert}")
    store.succeed("postqueue -f")
    wait_delivered(store)
    raw = stored(cluster, user, tok)
    assert body(pgp_mime_decrypt(home, raw)) == body(sent)


def test_a_correspondents_client_finds_the_key_in_the_web_key_directory(cluster, openpgp_user, tmp_path):
    """The site publishes its Web Key Directory (wkd, with the direct method; on the test
    Internet's ACME CA, where the site is not on it yet) and fe1 is rebooted with the new
    credentials. GnuPG, as a correspondent's client on the test Internet (its resolver,
    its CA), finds the user's key by address; fe1 serves the site's certificate, byte for
    byte, at both of WKD's URLs, and nothing for an address without one."""
    user, home = openpgp_user
    site = cluster.site
    tls = site.tls if site.tls.acme is not None else Tls(acme=Acme(
        directory=internet.ACME_DIRECTORY, contact=f"postmaster@{site.domain}", ca=cluster.internet.ca))
    cluster.site = site.model_copy(update={"tls": tls, "wkd": Wkd(direct=True)})
    cluster.internet.serve(internet.site_zones(cluster.site, cluster.secrets))
    (fe,) = reboot_with_new_credentials(cluster, "fe1")
    wait_acme_certificate(cluster, fe)
    fe.wait_for_unit("haproxy.service")
    roots = tmp_path / "acme-roots.pem"
    roots.write_text(cluster.internet.acme_roots())
    expected = gpg(home, "--export", user).stdout  # the site's certificate, unarmored
    domain, h = user.split("@")[1], wkd_hash(user)
    for host, path in ((f"openpgpkey.{domain}", f"/.well-known/openpgpkey/{domain}/hu/{h}?l=dave"),
                       (domain, f"/.well-known/openpgpkey/hu/{h}?l=dave")):
        status, body, _ = https_get(fe.forward(443), host, path, roots)
        assert (status, body) == ("HTTP/1.1 200 OK", expected), (host, status)
        missing = https_get(fe.forward(443), host, path.replace(h, wkd_hash("alice@x")), roots)[0]
        assert missing == "HTTP/1.1 404 Not Found"
    # The client: a GnuPG home of its own on the test Internet, where names resolve through
    # the test resolver and the ACME CA's root is the one trusted.
    client = tmp_path / "client"
    client.mkdir(mode=0o700)
    tools.GNUPG_HOMES.append(client)
    (client / "dirmngr.conf").write_text("standard-resolver\n")
    (tmp_path / "resolv.conf").write_text(f"nameserver {cluster.internet.ip}\n")
    script = ('mount --bind "$1" /etc/resolv.conf && mount --bind "$2" /etc/ssl/certs/ca-certificates.crt && '
              'exec gpg --homedir "$3" --batch --auto-key-locate clear,wkd --locate-keys "$4"')
    cluster.internet.exec("unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                          str(tmp_path / "resolv.conf"), str(roots), str(client), user)
    assert gpg(client, "--export", user).stdout == expected


# ---- no plaintext spool: the filters' queue on eCryptfs ----------------------------------
def spool_message(rcpt: str, tok: str) -> bytes:
    """A message whose subject and body carry `tok`, and nothing that Postfix logs does
    (the journal keeps envelope addresses and the Message-ID, which is random here)."""
    return (f"From: {SENDER}\r\nTo: {rcpt}\r\nSubject: spooled {tok}\r\nDate: {email.utils.formatdate()}\r\n"
            f"Message-ID: <{new_tokens(1)[0][1][3:]}@example.org>\r\n\r\nspooled body {tok}\r\n").encode()


def test_mail_waiting_on_the_filters_is_on_no_disk_in_plaintext(cluster, tmp_path):
    """While the mailstore takes no mail, 50 messages wait in the filters' queues; each
    filter's disk, read raw on the host meanwhile, holds none of their subjects and bodies.
    Then every message arrives once, and no disk of the running cluster (frontend,
    filters, mailstore) holds them in plaintext either."""
    store = cluster["store1"]
    msgs = [(USERS[i % len(USERS)], t) for i, (_, t) in enumerate(new_tokens(50))]
    tokens = [t for _, t in msgs]

    def scan(names) -> None:
        for name in names:
            found, control = scan_disk(cluster[name], tmp_path, tokens, b"mailcluster", live=True)
            assert control > 0, f"{name}: the scan read no file system"
            assert found == set(), f"{name}: {len(found)} of the messages are on its disk in plaintext"

    store.succeed("systemctl stop postfix.service")
    try:
        send_all(cluster, [(rcpt, spool_message(rcpt, tok)) for rcpt, tok in msgs])
        waiting = retry(lambda last: {n: queued(cluster[n]) for n in FILTERS}, timeout=120, interval=2,
                        until=lambda q: sum(q.values()) == len(msgs))
        print("waiting on the filters:", waiting)
        scan(FILTERS)
    finally:
        store.succeed("systemctl start postfix.service")
    for name in FILTERS:
        cluster[name].succeed("postqueue -f")
    wait_in_mailboxes(cluster, tokens)
    assert sorted(t for t in mailbox_tokens(cluster) if t in set(tokens)) == sorted(tokens)
    scan(("fe1", *FILTERS, "store1"))


def test_a_filter_without_its_queue_key_takes_no_mail_and_mail_flows_through_the_other(cluster):
    f2 = cluster["filter2"]
    fingerprint = "find /var/lib/mailcluster/spool -printf '%p %s %T@\\n' | sort | sha256sum"
    f2.succeed("systemctl stop postfix.service")  # a quiet queue: only the boot below could change it
    before = f2.succeed(fingerprint)
    key = f2.spec.credentials.pop("mailcluster.spool-key")
    try:
        f2.shutdown()
        f2.start()
        f2.wait_until_succeeds('s=$(systemctl is-system-running || true); echo "$s"; test "$s" = degraded',
                               timeout=600)
        assert f2.succeed("systemctl show -P ActiveState postfix.service").strip() == "inactive"
        said = f2.succeed("journalctl -b -u mailcluster-spoolcrypt --no-pager")
        assert "no eCryptfs key: credential mailcluster.spool-key is missing" in said, said
        assert f2.succeed("ss -Htln '( sport = :25 )'").strip() == ""
        f2.fail("mountpoint -q /var/spool/postfix")
        assert f2.succeed(fingerprint) == before
        wait_backends(cluster, {"filter1": "UP", "filter2": "DOWN"})
        msgs = new_tokens(6)
        assert send(cluster, msgs) == [t for _, t in msgs]
        wait_in_mailboxes(cluster, [t for _, t in msgs])
    finally:
        f2.spec.credentials["mailcluster.spool-key"] = key
        f2.shutdown()
        f2.start()
        f2.wait_for_unit("postfix.service", timeout=600)
        wait_backends(cluster, {"filter1": "UP", "filter2": "UP"}, timeout=300)
