"""The Web Key Directory (wkd): what the site file may say, the records ./build.py dns
prints, the credential that carries the users' certificates to the frontends, and the
frontend's check of it before HAProxy serves anything (the VM test fetches the keys with
GnuPG through a booted frontend)."""
import base64
import os
import subprocess

import pytest
import yaml

from appliance import paths
from appliance.credentials import Secrets, node_credentials
from appliance.errors import ConfigError
from appliance.openpgp import wkd_hash
from appliance.profiles import ProfileSet
from appliance.site import load_site
from tests.tools import build_py, openpgp_key, script_lib
from tests.unit.test_dns import parse

ROLES = ProfileSet.load().roles
LIB = paths.OVERLAYS / "40-frontend/usr/lib/mailcluster"
LIBEXEC = paths.OVERLAYS / "40-frontend/usr/libexec/mailcluster"
ACME = {"directory": "https://acme.example.net/dir", "contact": "hostmaster@example.test"}
DAVE = "dave@example.test"


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return openpgp_key(tmp_path_factory.mktemp("gnupg") / "dave", DAVE)


def wkd_site(tmp_path, cert, wkd: dict | None, tls: dict | None = None, without_role: str | None = None):
    data = yaml.safe_load(paths.EXAMPLE_SITE.read_text())
    data["tls"] = {"acme": ACME} if tls is None else tls
    if wkd is not None:
        data["wkd"] = wkd
    data["users"].append({"address": DAVE, "openpgp": str(cert)})
    if without_role:
        data["nodes"] = [n for n in data["nodes"] if n["role"] != without_role]
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def armored_body(cert: str) -> bytes:
    """The certificate's bytes, read from its armor by hand (RFC 4880, 6.2): what a WKD
    serves, without the tool the builder uses."""
    lines = cert.strip().splitlines()
    body = lines[lines.index("") + 1:]
    return base64.b64decode("".join(line for line in body if not line.startswith(("=", "-----"))))


def test_the_hash_is_the_drafts_for_the_local_part_in_any_case():
    # (the draft's own example: Joe.Doe@Example.ORG)
    assert wkd_hash("Joe.Doe@Example.ORG") == "iy9q119eutrkn8s1mk4r39qejnbu3n5q"
    assert wkd_hash("joe.doe@example.org") == wkd_hash("JOE.DOE@x")


@pytest.mark.parametrize("wkd, tls, without_role, problem", [
    ({}, {}, None, "wkd: the frontends serve the Web Key Directory over HTTPS with a certificate"),
    ({}, None, "frontend", "wkd: the frontends serve the Web Key Directory, and this site has none"),
    ({"direct": "sometimes"}, None, None, "wkd.direct"),
    ({"indirect": True}, None, None, "wkd.indirect: unknown key"),
])
def test_the_site_refuses_a_directory_nobody_could_serve(tmp_path, cert, wkd, tls, without_role, problem):
    with pytest.raises(ConfigError, match=problem):
        load_site(wkd_site(tmp_path, cert, wkd, tls, without_role), ROLES)


@pytest.mark.parametrize("direct", [False, True])
def test_the_frontends_get_the_directory_its_names_and_its_records(tmp_path, cert, direct):
    site = load_site(wkd_site(tmp_path, cert, {"direct": direct}), ROLES)
    secrets = Secrets(tmp_path / "secrets")
    fe = node_credentials(site, site.node("fe1"), None, secrets)
    lines = fe["mailcluster.wkd"].decode().splitlines()
    assert lines[1:3] == ["domain example.test", "domain example.com"]
    assert ("direct" in lines) == direct
    (key,) = [line.split() for line in lines if line.startswith("key ")]
    assert key[:3] == ["key", "example.test", wkd_hash(DAVE)]
    assert base64.b64decode(key[3]) == armored_body(cert.read_text())
    names = fe["mailcluster.acme"].decode().splitlines()[2].split()
    assert names == ["openpgpkey.example.test", "openpgpkey.example.com"] + (["example.test", "example.com"] * direct)
    for node in site.nodes:
        if node.role != "frontend":
            assert "mailcluster.wkd" not in node_credentials(site, node, None, secrets)
    r = build_py("--site", str(tmp_path / "site.yaml"), "dns", env={"MAILCLUSTER_SECRETS": str(tmp_path / "secrets")})
    assert r.returncode == 0, r.stderr
    zone = parse(r.stdout)
    for domain in site.mail_domains:
        assert [rd.to_text() for rd in zone[(f"openpgpkey.{domain}.", "A")]] == ["10.77.0.10"]
        assert ((f"{domain}.", "A") in zone) == direct


def run_wkd(tmp_path, credential: bytes, mta_sts: bool = False) -> subprocess.CompletedProcess:
    lib = tmp_path / "lib"
    if not lib.exists():
        script_lib(lib, "frontend")
        (lib / "https.sh").symlink_to(LIB / "https.sh")
        (lib / "haproxy-https.cfg").write_text("frontend https\n")
    creds, run = tmp_path / "creds", tmp_path / "run"
    creds.mkdir(exist_ok=True)
    run.mkdir(exist_ok=True)  # (/run/mailcluster, on a node)
    (creds / "mailcluster.wkd").write_bytes(credential)
    env = {**os.environ, "CREDENTIALS_DIRECTORY": str(creds), "MC_LIB": str(lib), "MC_RUN": str(run)}
    if mta_sts:
        (creds / "mailcluster.mta-sts").write_bytes(b"version: STSv1\r\nmode: testing\r\nmx: fe1.example.test\r\n"
                                                    b"max_age: 86400\r\n")
        r = subprocess.run(["bash", str(LIBEXEC / "mta-sts")], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    return subprocess.run(["bash", str(LIBEXEC / "wkd")], capture_output=True, text=True, timeout=30, env=env)


def credential_of(tmp_path, cert, direct: bool = False) -> bytes:
    site = load_site(wkd_site(tmp_path, cert, {"direct": direct}), ROLES)
    return node_credentials(site, site.node("fe1"), None, Secrets(tmp_path / "secrets"))["mailcluster.wkd"]


def rules(tmp_path) -> list[list[str]]:
    return [line.split() for line in (tmp_path / "run/haproxy.d/https.cfg").read_text().splitlines()[1:]]


@pytest.mark.parametrize("direct", [False, True])
def test_the_frontend_serves_each_key_at_its_wkd_url(tmp_path, cert, direct):
    r = run_wkd(tmp_path, credential_of(tmp_path, cert, direct), mta_sts=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("serving the Web Key Directory: 1 certificates for example.test example.com")
    h = wkd_hash(DAVE)
    served = tmp_path / f"run/wkd/example.test/{h}"
    assert served.read_bytes() == armored_body(cert.read_text())
    answers = {(r[r.index("path") + 1], r[r.index("var(txn.host)") + 3]): r[r.index("file") + 1] if "file" in r else ""
               for r in rules(tmp_path) if "return" in r and "status" in r and r[3] == "200" and "path" in r
               and "/.well-known/mta-sts.txt" not in r}
    expected = {(f"/.well-known/openpgpkey/{d}/policy", f"openpgpkey.{d}"): "" for d in ("example.test", "example.com")}
    expected[(f"/.well-known/openpgpkey/example.test/hu/{h}", "openpgpkey.example.test")] = str(served)
    if direct:
        expected.update({("/.well-known/openpgpkey/policy", d): "" for d in ("example.test", "example.com")})
        expected[(f"/.well-known/openpgpkey/hu/{h}", "example.test")] = str(served)
    assert answers == expected
    # the MTA-STS policy's rule is still there (the two share port 443), once, and 404 last
    assert sum("/.well-known/mta-sts.txt" in r for r in rules(tmp_path)) == 1
    assert rules(tmp_path)[-1][3] == "404"


@pytest.mark.parametrize("line, problem", [
    (b"key example.org ybndrfg8ejkmcpqxot1uwisza345h769 mQ==", "which no domain line names"),
    (b"key ../../etc ybndrfg8ejkmcpqxot1uwisza345h769 mQ==", "not a line of a Web Key Directory"),
    (b"key example.test ../../../../etc/shadowxxxxxxxxxx mQ==", "not a line of a Web Key Directory"),
    (b"key example.test ybndrfg8ejkmcpqxot1uwisza345h769 PGh0bWw+", "not an OpenPGP certificate"),
    (b"key example.test ybndrfg8ejkmcpqxot1uwisza345h769 !!!", "not a line of a Web Key Directory"),
    (b"domain example.test", "example.test is listed twice"),
    (b"domain -x.test", "is no domain name"),
    (b"http-request return status 200 file /etc/shadow", "not a line of a Web Key Directory"),
])
def test_a_directory_someone_altered_is_refused_and_nothing_is_served(tmp_path, cert, line, problem):
    good = credential_of(tmp_path, cert)
    assert run_wkd(tmp_path, good).returncode == 0
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    r = run_wkd(tmp_path, good + line + b"\n")
    assert r.returncode == 1 and problem in r.stderr, r.stderr
    assert "./build.py credentials NODE" in r.stderr
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["haproxy.d", "https.d", "wkd"]
