"""OpenPGP at rest (#20): mail to a user who gave the site a certificate is stored
PGP/MIME-encrypted to it. What a user fetches over IMAP is decrypted on the host by GnuPG,
an independent implementation, with the user's secret key, which never left the host.
The frontends publish the certificates in a Web Key Directory, and a filter without the
key of its queue takes no mail. (Mail waiting on the filters, read on every disk:
tests/vm/test_resilience.py, where the backup runs too.)"""
from __future__ import annotations

import email
import email.utils

import pytest

from appliance.openpgp import wkd_hash
from appliance.site import Acme, Tls, Wkd
from appliance.wait import Timeout, retry
from tests import internet, tools
from tests.tools import gpg, openpgp_key, pgp_mime_decrypt, pgp_mime_signed, pgp_mime_verify
from tests.vm.mail import (FILTERS, assert_locked, https_get, imap_messages, lower_fingerprint, message, new_tokens,
                           queued_for, reboot_with_new_credentials, send, send_all, supply_key, wait_acme_certificate,
                           wait_backends, wait_degraded, wait_delivered, wait_in_mailboxes, wait_mail_flows)

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
    send_all(c, [(rcpt, data)], sender=SENDER)


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
    """The site publishes its Web Key Directory (wkd, with the direct method, on the test
    Internet's ACME CA): fe1 booted with those credentials (in the ACME test's reboot, or
    here when that test did not run). GnuPG, as a correspondent's client on the test
    Internet (its resolver, its CA), finds the user's key by address; fe1 serves the
    site's certificate, byte for byte, at both of WKD's URLs, and nothing for an address
    without one."""
    user, home = openpgp_user
    site = cluster.site
    fe = cluster["fe1"]
    if site.wkd is None or site.tls.acme is None:
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
# (the 50 messages that wait on the filters while the mailstores are down, and every disk
# read afterwards, backup included: tests/vm/test_resilience.py)
SPOOL_KEY = "mailcluster.spool-key"


def test_a_filter_without_its_queue_key_takes_no_mail_and_mail_flows_through_the_other(cluster):
    """filter2 booted without its queue key: Postfix down, port 25 closed, its ciphertext
    untouched, HAProxy marks it DOWN and mail flows through filter1. The key, given on the
    running node, brings it back without a reboot."""
    f2, lower = cluster["filter2"], "/var/lib/mailcluster/spool"
    f2.succeed("systemctl stop postfix.service")  # a quiet queue: only the boot below could change it
    before = lower_fingerprint(f2, lower)
    key = f2.spec.credentials.pop(SPOOL_KEY)
    try:
        f2.shutdown()
        f2.start()
        wait_degraded(f2)
        assert_locked(f2, "mailcluster-spoolcrypt", f"no eCryptfs key: credential {SPOOL_KEY} is missing",
                      lower=lower, before=before, upper="/var/spool/postfix", services=("postfix.service",),
                      ports=(25,))
        wait_backends(cluster, {"filter1": "UP", "filter2": "DOWN"})
        msgs = new_tokens(6)
        assert send(cluster, msgs) == [t for _, t in msgs]
        wait_in_mailboxes(cluster, [t for _, t in msgs])
        rc, out = supply_key(f2, SPOOL_KEY, key, "postfix.service")
        assert rc == 0, out
        wait_backends(cluster, {"filter1": "UP", "filter2": "UP"}, timeout=300)
    finally:
        f2.spec.credentials[SPOOL_KEY] = key
        if f2.execute("systemctl is-active -q postfix.service")[0] != 0:
            f2.shutdown()  # leave the shared cluster's filter working
            f2.start()
            f2.wait_for_unit("postfix.service", timeout=600)
            wait_backends(cluster, {"filter1": "UP", "filter2": "UP"}, timeout=300)
