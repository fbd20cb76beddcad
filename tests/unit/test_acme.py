"""ACME (tls.acme): what the site file accepts, what each node is given, the answer every
node's port 80 gives a challenge, what a node does with a certificate its CA issued, and
DNS-01's updates of a real DNS server (Knot). (Against a real CA, pebble:
tests/vm/test_inbound.py.)"""
import base64
import hashlib
import json
import os
import re
import shutil
import subprocess

import pytest
import yaml

from appliance import dns, paths
from appliance.credentials import Secrets, node_credentials
from appliance.errors import ConfigError
from appliance.plan import Plan
from appliance.paths import HOST_PATH
from appliance.profiles import ProfileSet
from appliance.qemu import free_port
from appliance.site import load_site
from appliance.wait import retry
from tests import internet
from tests.tools import script_lib, site_certificate

CHALLENGE = paths.OVERLAYS / "10-base/usr/libexec/mailcluster/acme-challenge"
ACME = paths.OVERLAYS / "25-tls/usr/libexec/mailcluster/acme"
ROLES = ProfileSet.load().roles


def acme_site(tmp_path, **acme_settings):
    data = yaml.safe_load(paths.EXAMPLE_SITE.read_text())
    data["tls"] = {"acme": {"directory": "https://acme.example.net/dir", "contact": "hostmaster@example.test",
                            **acme_settings}}
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("settings, problem", [
    ({"directory": "http://acme.example.net/dir"}, "tls.acme.directory"),
    ({"directory": "https://acme.example.net/dir\nX"}, "tls.acme.directory"),
    ({"directory": "https://acme.example.net/dir' -h /bin/sh"}, "tls.acme.directory"),
    ({"contact": "not an address"}, "tls.acme.contact"),
    ({"ca": "missing.pem"}, "missing.pem: CA certificate not found"),
])
def test_a_bad_acme_setting_is_refused_by_name(tmp_path, settings, problem):
    with pytest.raises(ConfigError) as e:
        load_site(acme_site(tmp_path, **settings), ROLES)
    assert problem in str(e.value), str(e.value)


def test_acme_and_a_site_certificate_exclude_each_other(tmp_path):
    chain, key, _ = site_certificate(tmp_path / "cert", ["mx.example.test"])
    path = acme_site(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["tls"].update(certificate=str(chain), key=str(key))
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="tls.certificate and tls.acme exclude each other"):
        load_site(path, ROLES)


def test_each_node_gets_what_it_needs_and_no_more(tmp_path):
    _, _, ca = site_certificate(tmp_path / "ca", ["acme.example.net"])
    site = load_site(acme_site(tmp_path, ca=str(ca)), ROLES)
    secrets = Secrets(tmp_path / "secrets")
    key = secrets.acme_account_key()
    creds = {n.name: node_credentials(site, n, None, secrets) for n in site.nodes}
    for name, c in creds.items():
        assert c["mailcluster.acme-thumbprint"].decode().strip() == thumbprint_of(key), name
    # The frontend answers challenges; it orders nothing and never holds the account key.
    assert not {k for k in creds["fe1"] if k.startswith("mailcluster.acme") and k != "mailcluster.acme-thumbprint"}
    assert creds["filter1"]["mailcluster.acme"].decode().splitlines() == [
        "https://acme.example.net/dir", "hostmaster@example.test", "fe1.example.test"]  # the MX
    assert creds["store1"]["mailcluster.acme"].decode().splitlines()[2] == "store1.example.test fe1.example.test"
    assert creds["store1"]["mailcluster.acme-account"].decode() == key
    assert creds["store1"]["mailcluster.acme-ca"].decode() == ca.read_text()
    assert "ACME: each node gets its own from https://acme.example.net/dir" in Plan.of(
        ProfileSet.load(), site, "filter").tls


def thumbprint_of(key: str) -> str:
    """RFC 7638 from openssl's own reading of the key (not the DER slicing acme.py does)."""
    text = subprocess.run(["openssl", "pkey", "-text", "-noout"], input=key, capture_output=True, text=True,
                          check=True).stdout
    pub = bytes.fromhex("".join(re.search(r"pub:\n((?:\s+[0-9a-f:]+\n)+)", text).group(1).split()).replace(":", ""))
    b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()  # noqa: E731
    jwk = json.dumps({"crv": "P-256", "kty": "EC", "x": b64(pub[1:33]), "y": b64(pub[33:65])}, separators=(",", ":"))
    return b64(hashlib.sha256(jwk.encode()).digest())


def answer(tmp_path, request: bytes, thumbprint: str = "T" * 43) -> bytes:
    creds = tmp_path / "creds"
    creds.mkdir(exist_ok=True)
    (creds / "mailcluster.acme-thumbprint").write_text(thumbprint + "\n")
    r = subprocess.run(["bash", str(CHALLENGE)], input=request, capture_output=True, timeout=30,
                       env={**os.environ, "CREDENTIALS_DIRECTORY": str(creds)})
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_port_80_answers_a_challenge_of_the_account_and_nothing_else(tmp_path):
    token = "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"
    got = answer(tmp_path, f"GET /.well-known/acme-challenge/{token} HTTP/1.1\r\nHost: fe1.example.test\r\n"
                           "User-Agent: pebble\r\n\r\n".encode())
    head, body = got.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.0 200 ") and body == f"{token}.{'T' * 43}".encode()
    for request in (b"GET /.well-known/acme-challenge/../../etc/passwd HTTP/1.1\r\n\r\n",
                    b"GET /.well-known/acme-challenge/short HTTP/1.1\r\n\r\n",
                    b"GET /.well-known/acme-challenge/" + b"a" * 200 + b" HTTP/1.1\r\n\r\n",
                    b"GET /.well-known/acme-challenge/abcdefghijklmnopqrstu<script> HTTP/1.1\r\n\r\n",
                    b"POST /.well-known/acme-challenge/abcdefghijklmnopqrstuvwx HTTP/1.1\r\n\r\n",
                    b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x02\x00", b""):
        got = answer(tmp_path, request)
        assert got.startswith(b"HTTP/1.0 404 ") and got.endswith(b"\r\n\r\n"), (request, got)
    # A damaged thumbprint credential answers nothing either.
    assert answer(tmp_path, f"GET /.well-known/acme-challenge/{token} HTTP/1.1\r\n\r\n".encode(),
                  thumbprint="x\r\nSet-Cookie: a").startswith(b"HTTP/1.0 404 ")


class Node:
    """A node's ACME state on the host: its credentials, the directories the script
    writes, and uacme and systemctl as this test's commands (recording their calls)."""

    def __init__(self, tmp_path, acme_credential: str, account_exists: bool = False, due: bool = True):
        self.root = tmp_path
        self.creds, self.tls, self.conf, self.bin = (tmp_path / d for d in ("creds", "tls", "acme", "bin"))
        for d in (self.creds, self.tls, self.bin):
            d.mkdir()
        (self.creds / "mailcluster.acme").write_text(acme_credential)
        (self.creds / "mailcluster.acme-account").write_text("ACCOUNT KEY\n")
        self.calls = tmp_path / "calls"
        self.calls.touch()
        chain, key, _ = site_certificate(tmp_path / "issued", ["store1.example.test"])
        uacme = f"""echo "uacme $* CAINFO=${{UACME_CAINFO:-}}" >>{self.calls}
conf=$2 args=("$@")
for i in "${{!args[@]}}"; do [[ ${{args[$i]}} == issue ]] && name=${{args[$((i + 1))]}}; done
case " $* " in
*" new "*) {'echo "Account already exists at https://ca/acct/1" >&2; exit 2' if account_exists else 'exit 0'} ;;
*" issue "*) {'' if due else 'exit 1'}
  mkdir -p "$conf/$name" "$conf/private/$name"
  cp {chain} "$conf/$name/cert.pem"; cp {key} "$conf/private/$name/key.pem" ;;
esac"""
        for name, body in {"uacme": uacme, "systemctl": f'echo "systemctl $*" >>{self.calls}'}.items():
            (self.bin / name).write_text(f"#!/bin/bash\n{body}\n")
            (self.bin / name).chmod(0o755)
        self.chain = chain

    def run(self, *args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "MC_LIB": str(script_lib(self.root / "lib", "mailstore")), "MC_TLS_DIR": str(self.tls),
               "MC_ACME_DIR": str(self.conf), "CREDENTIALS_DIRECTORY": str(self.creds),
               "PATH": f"{self.bin}:{os.environ['PATH']}"}
        return subprocess.run(["bash", str(ACME), *args], env=env, capture_output=True, text=True)


GOOD = "https://acme.example.net/dir\nhostmaster@example.test\nstore1.example.test fe1.example.test\n"


def test_a_certificate_from_the_ca_is_installed_and_the_daemons_reload(tmp_path):
    node = Node(tmp_path, GOOD, account_exists=True)  # another node created the account
    r = node.run("force")
    assert r.returncode == 0, r.stderr
    assert (node.tls / "cert.pem").read_text() == node.chain.read_text()
    assert (node.tls / "source").read_text().strip() == "acme"
    calls = node.calls.read_text()
    assert "issue store1.example.test fe1.example.test" in calls and " -f " in calls
    # Reloaded, never restarted: open connections stay.
    assert "systemctl reload postfix.service" in calls and "restart" not in calls


def test_a_certificate_not_due_is_left_alone(tmp_path):
    node = Node(tmp_path, GOOD, due=False)
    r = node.run()
    assert r.returncode == 0 and "not due for renewal" in r.stdout, r
    assert not (node.tls / "cert.pem").exists() and "reload" not in node.calls.read_text()


@pytest.mark.parametrize("credential", [
    "http://acme.example.net/dir\nhostmaster@example.test\nstore1.example.test\n",
    "https://acme.example.net/dir\nhostmaster@example.test\n\n",
    "https://acme.example.net/dir\nhostmaster@example.test\nstore1.example.test -h/bin/sh\n",
    "https://acme.example.net/dir\n--help\nstore1.example.test\n",
])
def test_a_malformed_acme_credential_is_refused_before_the_ca_is_asked(tmp_path, credential):
    node = Node(tmp_path, credential)
    r = node.run()
    assert r.returncode == 1 and "credential mailcluster.acme" in r.stderr, r
    assert "uacme" not in node.calls.read_text()


# ---- DNS-01 -----------------------------------------------------------------------------
HOOK = paths.OVERLAYS / "25-tls/usr/libexec/mailcluster/acme-hook"


def dns_site(tmp_path, key_text: str | None, mode: int = 0o600):
    key = tmp_path / "dns-update.key"
    if key_text is not None:
        key.touch(mode=mode)
        key.chmod(mode)
        key.write_text(key_text)
    return acme_site(tmp_path, dns_update={"server": "192.0.2.53", "port": 5353, "key": "dns-update.key"})


@pytest.mark.parametrize("key_text, mode, problem", [
    (None, 0o600, "dns-update.key: TSIG key not found"),
    (internet.tsig_key_text("c2VjcmV0IHNlY3JldCBzZWNyZXQ="), 0o644, "readable by other users (mode 0644)"),
    ('key "a" { algorithm hmac-md5; secret "c2VjcmV0IHNlY3JldCBzZWNyZXQ="; };\n', 0o600, "expected one TSIG key"),
    (internet.tsig_key_text("c2VjcmV0IHNlY3JldCBzZWNyZXQ=") + 'include "/etc/passwd";\n', 0o600,
     "expected one TSIG key"),
])
def test_a_bad_dns_update_key_is_refused_with_the_fix(tmp_path, key_text, mode, problem):
    with pytest.raises(ConfigError) as e:
        load_site(dns_site(tmp_path, key_text, mode), ROLES)
    assert "tls.acme.dns_update.key" in str(e.value) and problem in str(e.value), str(e.value)
    assert "tsig-keygen" in e.value.hint or "chmod 600" in e.value.hint


def test_only_the_nodes_that_order_get_the_dns_update_key(tmp_path):
    secret = base64.b64encode(os.urandom(32)).decode()
    site = load_site(dns_site(tmp_path, f'key "acme-update" {{ algorithm "hmac-sha256"; secret "{secret}"; }};'),
                     ROLES)
    secrets = Secrets(tmp_path / "secrets")
    creds = {n.name: node_credentials(site, n, None, secrets) for n in site.nodes}
    for name in ("filter1", "store1"):
        assert creds[name]["mailcluster.acme-dns"] == b"192.0.2.53 5353\n"
        # Rewritten from its parts, as nsupdate reads it.
        assert creds[name]["mailcluster.acme-dns-key"].decode() == internet.tsig_key_text(secret)
    assert not {k for k in creds["fe1"] if k.startswith("mailcluster.acme-dns")}  # orders nothing
    # DNS-01 instead of HTTP-01: no node's port 80 answers challenges.
    assert not any("mailcluster.acme-thumbprint" in c for c in creds.values())


@pytest.fixture
def knot(tmp_path):
    """A real Knot on 127.0.0.1 serving example.test, taking TXT updates with a TSIG key."""
    workdir, port = tmp_path / "knot-zones", free_port()
    workdir.mkdir()
    (workdir / "example.test.zone").write_text(
        "$ORIGIN example.test.\n$TTL 300\n@ SOA ns hostmaster 1 3600 600 86400 300\n@ NS ns\nns A 127.0.0.1\n")
    secret = base64.b64encode(os.urandom(32)).decode()
    conf = internet.knot_config(workdir, f"127.0.0.1@{port}", secret, ["example.test"])
    proc = subprocess.Popen([shutil.which("knotd", path=HOST_PATH) or "knotd", "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield port, secret, lambda name: txt_records(port, name)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def txt_records(port: int, name: str) -> list[str]:
    """What the server answers for `name` TXT (./build.py dns --check's lookup), asked
    again while it is still starting."""
    def ask(last: bool) -> list[str] | None:
        try:
            return dns.lookup(f"127.0.0.1:{port}", name, "TXT")
        except ConfigError:
            if last:
                raise
            return None

    return retry(ask, timeout=30, interval=0.2, until=lambda a: a is not None)


def hook(tmp_path, *args: str, server: str | None) -> subprocess.CompletedProcess:
    creds = tmp_path / "hook-creds"
    shutil.rmtree(creds, ignore_errors=True)
    creds.mkdir()
    if server is not None:
        (creds / "mailcluster.acme-dns").write_text(server)
        (creds / "mailcluster.acme-dns-key").write_text((tmp_path / "key").read_text())
    lib = tmp_path / "lib"
    if not lib.exists():
        script_lib(lib, "filter")
    return subprocess.run(["bash", str(HOOK), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "CREDENTIALS_DIRECTORY": str(creds), "MC_LIB": str(lib)})


def test_dns_01_puts_the_challenge_into_the_sites_dns_and_takes_it_out(tmp_path, knot):
    port, secret, published = knot
    (tmp_path / "key").write_text(internet.tsig_key_text(secret))
    digest = "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"
    name = "_acme-challenge.store1.example.test."
    assert published("example.test.") == []  # the server answers; nothing there yet
    # With the site's DNS server, HTTP-01 is declined (uacme offers DNS-01 next).
    assert hook(tmp_path, "begin", "http-01", "store1.example.test", "tok", digest,
                server=f"127.0.0.1 {port}\n").returncode == 1
    r = hook(tmp_path, "begin", "dns-01", "store1.example.test", "tok", digest, server=f"127.0.0.1 {port}\n")
    assert r.returncode == 0, r.stderr
    assert published(name) == [digest]
    r = hook(tmp_path, "done", "dns-01", "store1.example.test", "tok", digest, server=f"127.0.0.1 {port}\n")
    assert r.returncode == 0 and published(name) == [], r.stderr


def test_dns_01_refuses_what_it_cannot_trust_and_a_wrong_key(tmp_path, knot):
    port, secret, published = knot
    (tmp_path / "key").write_text(internet.tsig_key_text(base64.b64encode(os.urandom(32)).decode()))
    digest = "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"
    r = hook(tmp_path, "begin", "dns-01", "store1.example.test", "tok", digest, server=f"127.0.0.1 {port}\n")
    assert r.returncode == 1 and f"the DNS server at 127.0.0.1:{port} refused to add" in r.stderr, r.stderr
    assert published("_acme-challenge.store1.example.test.") == []
    (tmp_path / "key").write_text(internet.tsig_key_text(secret))
    for args, server, problem in (
            (("store1.example.test\nupdate add x", "tok", digest), f"127.0.0.1 {port}\n", "bad name"),
            (("store1.example.test", "tok", 'x" ; update delete example.test.'), f"127.0.0.1 {port}\n",
             "bad DNS-01 digest"),
            (("store1.example.test", "tok", digest), "ns.example.test 53\n", "expected ADDRESS PORT")):
        r = hook(tmp_path, "begin", "dns-01", *args, server=server)
        assert r.returncode == 1 and problem in r.stderr, (args, r.stderr)
    # Without the site's DNS server only HTTP-01 is taken.
    assert hook(tmp_path, "begin", "http-01", "store1.example.test", "tok", digest, server=None).returncode == 0
    assert hook(tmp_path, "begin", "dns-01", "store1.example.test", "tok", digest, server=None).returncode == 1
