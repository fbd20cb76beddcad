"""MTA-STS for the site's own domains (tls.mta_sts): what the site file may say, the
records and policy ./build.py dns prints, what the frontends get to serve it, and the
frontend's check of the policy it is handed."""
import os
import subprocess

import pytest
import yaml

from appliance import paths
from appliance.credentials import Secrets, node_credentials
from appliance.errors import ConfigError
from appliance.plan import Plan
from appliance.profiles import ProfileSet
from appliance.site import load_site
from tests.tools import build_py, script_lib
from tests.unit.test_dns import parse

ROLES = ProfileSet.load().roles
SCRIPT = paths.OVERLAYS / "40-frontend/usr/libexec/mailcluster/mta-sts"
HTTPS_LIB = paths.OVERLAYS / "40-frontend/usr/lib/mailcluster/https.sh"
ACME = {"directory": "https://acme.example.net/dir", "contact": "hostmaster@example.test"}


def sts_site(tmp_path, tls: dict, without_role: str | None = None):
    data = yaml.safe_load(paths.EXAMPLE_SITE.read_text())
    data["tls"] = tls
    if without_role:
        data["nodes"] = [n for n in data["nodes"] if n["role"] != without_role]
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("tls, without_role, problem", [
    ({"mta_sts": {"mode": "enforce"}}, None, "tls.mta_sts needs tls.acme"),
    ({"acme": ACME, "mta_sts": {}}, "frontend", "tls.mta_sts: the frontends serve the MTA-STS policy"),
    ({"acme": ACME, "mta_sts": {"mode": "strict"}}, None, "tls.mta_sts.mode"),
    ({"acme": ACME, "mta_sts": {"max_age": 60}}, None, "tls.mta_sts.max_age"),
])
def test_a_policy_the_cluster_cannot_serve_is_refused_with_the_fix(tmp_path, tls, without_role, problem):
    with pytest.raises(ConfigError) as e:
        load_site(sts_site(tmp_path, tls, without_role), ROLES)
    assert problem in str(e.value), str(e.value)


def test_dns_prints_the_policy_its_names_and_an_id_that_follows_it(tmp_path):
    env = {"MAILCLUSTER_SECRETS": str(tmp_path / "secrets")}

    def printed(mode: str) -> tuple[dict, str]:
        site = sts_site(tmp_path, {"acme": ACME, "mta_sts": {"mode": mode, "max_age": 86400}})
        r = build_py("--site", str(site), "dns", env=env)
        assert r.returncode == 0, r.stderr
        return parse(r.stdout), r.stdout

    zone, text = printed("enforce")
    for domain in ("example.test", "example.com"):
        # The policy's host: the frontend, which serves it and answers its ACME challenges.
        assert [rd.to_text() for rd in zone[(f"mta-sts.{domain}.", "A")]] == ["10.77.0.10"]
    (record,) = [b"".join(rd.strings).decode() for rd in zone[("_mta-sts.example.test.", "TXT")]]
    assert record.startswith("v=STSv1; id=")
    policy = [line.removeprefix(";   ") for line in text.splitlines() if line.startswith(";   ")]
    assert policy == ["version: STSv1", "mode: enforce", "mx: fe1.example.test", "max_age: 86400"]
    ident = record.removeprefix("v=STSv1; id=")
    assert ident.isalnum() and len(ident) <= 32  # RFC 8461, 3.1
    testing, _ = printed("testing")
    (changed,) = [b"".join(rd.strings).decode() for rd in testing[("_mta-sts.example.test.", "TXT")]]
    assert changed != record  # senders fetch the policy again only when the id changes


def test_the_frontend_orders_for_the_policy_names_and_never_gets_the_sites_key(tmp_path):
    profiles = ProfileSet.load()
    site = load_site(sts_site(tmp_path, {"acme": ACME, "mta_sts": {"mode": "enforce"}}), ROLES)
    creds = node_credentials(site, site.node("fe1"), None, Secrets(tmp_path / "secrets"))
    assert creds["mailcluster.acme"].decode().splitlines()[2] == "mta-sts.example.test mta-sts.example.com"
    assert creds["mailcluster.mta-sts"].decode() == (
        "version: STSv1\r\nmode: enforce\r\nmx: fe1.example.test\r\nmax_age: 604800\r\n")
    assert not any(k.startswith("mailcluster.tls") for k in creds)
    assert "for the MTA-STS policy's names only" in Plan.of(profiles, site, "frontend").tls

    plain = load_site(sts_site(tmp_path / "plain", {"acme": ACME}), ROLES)
    creds = node_credentials(plain, plain.node("fe1"), None, Secrets(tmp_path / "secrets"))
    assert "mailcluster.mta-sts" not in creds and "mailcluster.acme" not in creds
    assert Plan.of(profiles, plain, "frontend").tls is None


def serve(tmp_path, policy: bytes) -> subprocess.CompletedProcess:
    lib = script_lib(tmp_path / "lib", "frontend")
    (lib / "https.sh").symlink_to(HTTPS_LIB)
    (lib / "haproxy-https.cfg").write_text("frontend https\n")
    creds, run = tmp_path / "creds", tmp_path / "run"
    creds.mkdir()
    (run / "haproxy.d").mkdir(parents=True)
    (creds / "mailcluster.mta-sts").write_bytes(policy)
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "CREDENTIALS_DIRECTORY": str(creds), "MC_LIB": str(lib),
                               "MC_RUN": str(run)})


def test_the_frontend_serves_the_policy_it_was_given(tmp_path):
    policy = b"version: STSv1\r\nmode: testing\r\nmx: fe1.example.test\r\nmx: *.example.test\r\nmax_age: 86400\r\n"
    r = serve(tmp_path, policy)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "serving the MTA-STS policy (mode: testing)\n"
    assert (tmp_path / "run/mta-sts.txt").read_bytes() == policy
    frontend = (tmp_path / "run/haproxy.d/https.cfg").read_text().splitlines()
    assert frontend[0] == "frontend https" and frontend[-1].endswith('return status 404 content-type text/plain string "not found"')
    (rule,) = [line for line in frontend if "mta-sts.txt" in line]
    assert rule.split() == ["http-request", "return", "status", "200", "content-type", "text/plain", "file",
                            "/run/mailcluster/mta-sts.txt", "if", "METH_GET", "{", "path", "/.well-known/mta-sts.txt",
                            "}", "{", "var(txn.host)", "-m", "beg", "mta-sts.", "}"]


@pytest.mark.parametrize("policy, problem", [
    (b"", "credential mailcluster.mta-sts is missing"),
    (b"mode: enforce\r\nversion: STSv1\r\n", "does not start with version: STSv1"),
    (b"version: STSv1\r\nmode: enforce\r\nmx: a.example.test\r\n<html><script>x</script>\r\n", "bad line '<html>"),
    (b"version: STSv1\r\nmode: enforce\r\nmx: a.example.test ; rm -rf /\r\n", "bad line 'mx: a.example.test ; rm"),
    (b"version: STSv1\r\n" + b"mx: a.example.test\r\n" * 300, "larger than any policy"),
])
def test_a_policy_someone_altered_is_refused_and_nothing_is_served(tmp_path, policy, problem):
    r = serve(tmp_path, policy)
    assert r.returncode == 1 and problem in r.stderr, r.stderr
    assert "./build.py credentials NODE" in r.stderr
    assert not (tmp_path / "run/mta-sts.txt").exists()
    assert not (tmp_path / "run/haproxy.d/https.cfg").exists()
