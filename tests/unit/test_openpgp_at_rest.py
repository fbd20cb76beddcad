"""OpenPGP at rest, on the host: the mailstore's content filter (pgp-deliver, pgp-wrap)
encrypts with Sequoia's sqop as the image does, and GnuPG, an independent implementation,
decrypts and verifies what came out. What the site accepts as a user's certificate, and
the credential that carries the certificates to the mailstores."""
from __future__ import annotations

import grp
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from appliance import credentials, paths
from appliance.errors import ConfigError
from appliance.openpgp import read_certificate
from appliance.profiles import ProfileSet
from appliance.site import load_site
from tests.tools import gpg, openpgp_key, pgp_mime_decrypt, pgp_mime_signed, pgp_mime_verify, script_lib

LIBEXEC = paths.OVERLAYS / "60-mailstore/usr/libexec/mailcluster"
DAVE = "dave@example.test"
SENDER = "sender@example.org"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """dave's key (the recipient, with a certificate in the site) and a sender's key."""
    base = tmp_path_factory.mktemp("gnupg")
    return {"dave": base / "dave", "dave.asc": openpgp_key(base / "dave", DAVE),
            "sender": base / "sender", "sender.asc": openpgp_key(base / "sender", SENDER)}


def plain(token: str, rcpt: str = DAVE) -> bytes:
    """A message as Postfix's pipe hands it over: LF line ends, Received on top."""
    return (f"Received: from filter1.example.test (filter1 [10.77.0.21])\n\tby store1.example.test;"
            f" Mon, 7 Dec 2026 05:00:00 +0000\nFrom: {SENDER}\nTo: {rcpt}\nSubject: report {token}\n"
            f"Message-ID: <{token}@example.org>\nMIME-Version: 1.0\nContent-Type: text/plain;\n charset=utf-8\n"
            f"Content-Transfer-Encoding: 8bit\n\nbody {token}\n\n-- \nÄ signature\n\n").encode()


def wrap(cert: Path, message: bytes) -> subprocess.CompletedProcess:
    return subprocess.run([LIBEXEC / "pgp-wrap", cert], input=message, capture_output=True, timeout=60)


def header(message: bytes) -> str:
    return message.split(b"\n\n", 1)[0].decode()


# ---- pgp-wrap ----------------------------------------------------------------------------
def test_a_message_is_stored_as_pgp_mime_that_decrypts_to_its_exact_bytes(keys):
    original = plain("tok-exact")
    r = wrap(keys["dave.asc"], original)
    assert r.returncode == 0, r.stderr
    assert b"body tok-exact" not in r.stdout and "Ä".encode() not in r.stdout
    assert pgp_mime_decrypt(keys["dave"], r.stdout) == original


def test_routing_headers_stay_outside_and_content_headers_only_inside(keys):
    r = wrap(keys["dave.asc"], plain("tok-outer"))
    outer = header(r.stdout)
    for field in ("Received: from filter1.example.test", "\tby store1.example.test", f"From: {SENDER}",
                  f"To: {DAVE}", "Subject: report tok-outer", "Message-ID: <tok-outer@example.org>"):
        assert field in outer
    assert outer.count("MIME-Version:") == 1
    assert "charset=utf-8" not in outer and "Content-Transfer-Encoding" not in outer
    assert "multipart/encrypted" in outer


def test_a_signed_message_still_verifies_after_decryption(keys):
    signed = pgp_mime_signed(keys["sender"], SENDER, DAVE, "tok-signed")
    # (the pipe hands the message over with LF line ends, as Postfix keeps it)
    r = wrap(keys["dave.asc"], signed.replace(b"\r\n", b"\n"))
    assert r.returncode == 0, r.stderr
    inside = pgp_mime_decrypt(keys["dave"], r.stdout)
    status = pgp_mime_verify(keys["sender"], inside)
    assert "[GNUPG:] GOODSIG" in status, status
    # and the check can fail: the same part with one byte changed does not verify
    assert "[GNUPG:] BADSIG" in pgp_mime_verify(keys["sender"], inside.replace(b"signed body", b"signed bodY"))


SMIME = ("From: x@example.org\nTo: dave@example.test\nSubject: smime\nMIME-Version: 1.0\n"
         "Content-Type: application/pkcs7-mime; smime-type={kind};\n name=smime.p7m\n"
         "Content-Transfer-Encoding: base64\n\nMIAGCSqGSIb3DQEHA6CAMIACAQAxggFAMIIBPAIBADAkMBYxFDASBgNVBAMMC2V4\n")


@pytest.mark.parametrize("kind", ["pgp-mime", "inline-pgp", "smime-enveloped"])
def test_mail_that_is_already_encrypted_is_stored_as_it_came(keys, kind):
    if kind == "smime-enveloped":
        message = SMIME.format(kind="enveloped-data").encode()
    else:
        message = wrap(keys["dave.asc"], plain("tok-again")).stdout
        if kind == "inline-pgp":
            armored = gpg(keys["sender"], "--armor", "--encrypt", "--trust-model", "always", "--recipient-file",
                          str(keys["dave.asc"]), input=b"inline secret").stdout
            message = f"From: {SENDER}\nTo: {DAVE}\nSubject: inline\n\n".encode() + armored
    r = wrap(keys["dave.asc"], message)
    assert r.returncode == 0, r.stderr
    assert r.stdout == message


def test_smime_signed_data_is_not_encrypted_mail_and_gets_encrypted(keys):
    message = SMIME.format(kind="signed-data").encode()
    r = wrap(keys["dave.asc"], message)
    assert pgp_mime_decrypt(keys["dave"], r.stdout) == message


def test_a_certificate_sqop_cannot_use_fails_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.asc"
    bad.write_text("-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nbm90IGEga2V5\n-----END PGP PUBLIC KEY BLOCK-----\n")
    r = wrap(bad, plain("tok-bad"))
    assert r.returncode != 0 and r.stdout == b""


# ---- pgp-deliver ---------------------------------------------------------------------------
@pytest.fixture
def deliver(tmp_path, keys):
    """pgp-deliver as Postfix's pipe runs it on a mailstore whose credential gave dave a
    certificate; a stand-in for Postfix's sendmail records what it was handed (the VM tests
    run the real one)."""
    lib = script_lib(tmp_path / "lib", "mailstore")
    run = tmp_path / "run"
    certs = run / "openpgp"
    certs.mkdir(parents=True)
    (certs / f"{DAVE}.asc").write_bytes(keys["dave.asc"].read_bytes())
    (certs / "users").write_text(f"{DAVE}\n")
    sendmail = tmp_path / "sendmail"
    sendmail.write_text('#!/bin/sh\nprintf "%s\\n" "$@" >"$0.args"\ncat >"$0.in"\nexit "${SENDMAIL_STATUS:-0}"\n')
    sendmail.chmod(0o755)
    env = {**os.environ, "MC_LIB": str(lib), "MC_RUN": str(run), "MC_SENDMAIL": str(sendmail)}

    def run_(sender: str, rcpt: str, message: bytes, **extra: str):
        r = subprocess.run([LIBEXEC / "pgp-deliver", sender, rcpt], input=message, capture_output=True,
                           env={**env, **extra}, timeout=60)
        handed = sendmail.with_name("sendmail.in")
        args = sendmail.with_name("sendmail.args")
        out = (args.read_text().splitlines(), handed.read_bytes()) if handed.exists() else None
        return r, out

    run_.certs = certs
    return run_


def test_deliver_encrypts_for_a_user_with_a_certificate_in_any_letter_case(deliver, keys):
    original = plain("tok-deliver", rcpt="Dave@Example.TEST")
    r, (args, handed) = deliver(SENDER, "Dave@Example.TEST", original)
    assert r.returncode == 0, r.stderr
    assert args == ["-G", "-i", "-f", SENDER, "--", "Dave@Example.TEST"]
    assert pgp_mime_decrypt(keys["dave"], handed) == original


def test_deliver_passes_mail_to_a_user_without_a_certificate_unchanged(deliver):
    original = plain("tok-alice", rcpt="alice@example.test")
    r, (args, handed) = deliver("", "alice@example.test", original)
    assert r.returncode == 0, r.stderr
    assert args == ["-G", "-i", "-f", "", "--", "alice@example.test"] and handed == original


@pytest.mark.parametrize("fault", ["unreadable certificate", "no list", "sendmail fails"])
def test_a_broken_step_defers_with_75_and_hands_over_no_plaintext(deliver, fault):
    extra = {}
    if fault == "unreadable certificate":
        (deliver.certs / f"{DAVE}.asc").write_text("garbage\n")
    elif fault == "no list":
        (deliver.certs / "users").unlink()
    else:
        extra["SENDMAIL_STATUS"] = "1"
    r, out = deliver(SENDER, DAVE, plain("tok-fault"), **extra)
    assert r.returncode == 75, (r.returncode, r.stderr)
    if fault == "sendmail fails":
        assert b"body tok-fault" not in out[1]  # it got the encrypted message, and refused it
    else:
        assert out is None, "sendmail was handed something"


# ---- openpgp-certs -------------------------------------------------------------------------
@pytest.fixture
def certs_env(tmp_path):
    lib = script_lib(tmp_path / "lib", "mailstore")
    creds = tmp_path / "credentials"
    creds.mkdir()
    return {**os.environ, "MC_LIB": str(lib), "MC_RUN": str(tmp_path / "run"), "CREDENTIALS_DIRECTORY": str(creds),
            "MC_PGP_GROUP": grp.getgrgid(os.getgid()).gr_name}


def install_certs(env: dict, credential: str) -> subprocess.CompletedProcess:
    (Path(env["CREDENTIALS_DIRECTORY"]) / "mailcluster.openpgp").write_text(credential)
    return subprocess.run([LIBEXEC / "openpgp-certs"], env=env, capture_output=True, text=True, timeout=60)


def test_the_credential_becomes_the_certificates_and_the_list(certs_env, keys):
    cert = keys["dave.asc"].read_text()
    r = install_certs(certs_env, f"# comment\nuser Dave@example.test\n{cert}")
    assert r.returncode == 0, r.stderr
    out = Path(certs_env["MC_RUN"]) / "openpgp"
    assert (out / "users").read_text() == f"{DAVE}\n"
    assert (out / f"{DAVE}.asc").read_text() == cert
    assert oct((out / f"{DAVE}.asc").stat().st_mode & 0o777) == "0o640"
    # an empty credential (a site without certificates) gives an empty list, not none
    assert install_certs(certs_env, "# none\n").returncode == 0
    assert (out / "users").read_text() == "" and not (out / f"{DAVE}.asc").exists()


@pytest.mark.parametrize("credential", [
    "user ../x@example.test\n{cert}",
    "user dave@example.test\n{cert}user dave@example.test\n{cert}",
    "user dave@example.test\n{truncated}",
    "user dave@example.test\n-----BEGIN PGP PUBLIC KEY BLOCK-----\n$(reboot)\n-----END PGP PUBLIC KEY BLOCK-----\n",
    "dave@example.test\n{cert}",
])
def test_a_malformed_credential_installs_nothing(certs_env, keys, credential):
    cert = keys["dave.asc"].read_text()
    assert install_certs(certs_env, f"user {DAVE}\n{cert}").returncode == 0
    out = Path(certs_env["MC_RUN"]) / "openpgp"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = install_certs(certs_env, credential.format(cert=cert, truncated=cert[: len(cert) // 2]))
    assert r.returncode != 0 and r.stderr.startswith("openpgp-certs: "), r.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["openpgp"]  # no scratch left


# ---- the site's certificates ---------------------------------------------------------------
def test_the_site_refuses_what_is_no_usable_certificate_of_the_user(tmp_path, keys):
    home = tmp_path / "other"
    expired = openpgp_key(home / "expired", DAVE, made="20200101T000000")
    sign_only = openpgp_key(home / "signonly", DAVE, encrypt=False)
    secret = tmp_path / "secret.asc"
    secret.write_bytes(gpg(keys["dave"], "--armor", "--export-secret-keys", DAVE).stdout)
    two = tmp_path / "two.asc"
    two.write_text(keys["dave.asc"].read_text() + keys["sender.asc"].read_text())
    binary = tmp_path / "binary.gpg"
    binary.write_bytes(gpg(keys["dave"], "--export", DAVE).stdout)
    cases = {
        keys["sender.asc"]: "no user ID of this certificate is dave@example.test",
        secret: "holds a secret key",
        two: "expected one ASCII-armored public key block, found 2",
        binary: "not an ASCII-armored OpenPGP certificate",
        sign_only: "no key of this certificate can encrypt now",
        expired: "expired",
        tmp_path / "missing.asc": "cannot read",
    }
    for path, why in cases.items():
        with pytest.raises(ConfigError, match=why):
            read_certificate(path, DAVE)
    assert read_certificate(keys["dave.asc"], DAVE) == keys["dave.asc"].read_text()


def test_a_site_gives_every_mailstore_its_users_certificates(tmp_path, keys):
    profiles = ProfileSet.load()
    data = yaml.safe_load(paths.EXAMPLE_SITE.read_text())
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "dave.asc").write_bytes(keys["dave.asc"].read_bytes())
    data["users"].append({"address": DAVE, "openpgp": "keys/dave.asc"})
    site_file = tmp_path / "site.yaml"
    site_file.write_text(yaml.safe_dump(data))
    site = load_site(site_file, profiles.roles)
    secrets = credentials.Secrets(tmp_path / "secrets")
    for node in site.nodes:
        creds = credentials.node_credentials(site, node, None, secrets)
        if node.role == "mailstore":
            assert creds["mailcluster.openpgp"].decode().endswith(
                f"user {DAVE}\n{keys['dave.asc'].read_text()}"), node.name
        else:
            assert "mailcluster.openpgp" not in creds, node.name
    # a wrong certificate names the key path and what is wrong, before anything is built
    data["users"][-1]["openpgp"] = "keys/missing.asc"
    site_file.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"users\[[0-9]+\]\.openpgp: .*missing.asc: cannot read"):
        load_site(site_file, profiles.roles)
