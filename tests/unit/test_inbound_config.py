"""The inbound path's rendered configuration: the traps behind a PROXY-protocol balancer."""
import re
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from appliance import dns, paths
from appliance.plan import Plan
from appliance.errors import ConfigError
from appliance.profiles import ProfileSet
from appliance.credentials import Secrets, node_credentials, peers, public_key
from appliance.render import render, tree_hash
from appliance.site import parse_site


@pytest.fixture(scope="module")
def profiles():
    return ProfileSet.load()


def site_with(mutate=lambda d: None):
    data = yaml.safe_load(paths.EXAMPLE_SITE.read_text())
    mutate(data)
    return parse_site(data, "site.yaml", ["filter", "frontend", "mailstore"])


def rendered(profiles, site, role, tmp_path, path) -> str:
    out = render(Plan.of(profiles, site, role), tmp_path / role,
                 Path("/nonexistent/cache"), Path("/nonexistent/pkgs"))
    return next(out.glob(f"trees/*/*/{path}")).read_text()


def postconf(text: str) -> dict[str, str]:
    return dict(re.findall(r"^(\w+) = (.*)$", text, re.M))


def test_filter_trusts_only_itself_never_the_frontend(profiles, tmp_path):
    site = site_with()
    main = postconf(rendered(profiles, site, "filter", tmp_path, "etc/postfix/main.cf"))
    assert main["mynetworks"] == "127.0.0.0/8"
    assert main["postscreen_upstream_proxy_protocol"] == "haproxy"
    assert "smtpd_upstream_proxy_protocol" not in main  # ignored behind postscreen
    assert main["relay_recipient_maps"].startswith("texthash:")
    assert main["milter_default_action"] == "tempfail"  # rspamd down: retry, never pass unscanned
    assert main["maximal_queue_lifetime"] == main["bounce_queue_lifetime"] == "5d"


def test_without_a_frontend_the_filters_take_plain_smtp(profiles, tmp_path):
    site = site_with(lambda d: d.update(nodes=[n for n in d["nodes"] if n["role"] != "frontend"]))
    main = postconf(rendered(profiles, site, "filter", tmp_path, "etc/postfix/main.cf"))
    assert "postscreen_upstream_proxy_protocol" not in main


def test_peers_place_each_user_on_their_mailstore_and_backups_on_standby(tmp_path):
    site = site_with(lambda d: (d["nodes"].append({"name": "store3", "role": "mailstore", "address": "10.77.0.33"}),
                                d["users"][1].update(mailstore="store3")))
    records = [line.split() for line in peers(site).splitlines() if not line.startswith("#")]
    users = {r[1]: r[2] for r in records if r[0] == "user"}
    assert users == {"alice@example.test": "store1", "bob@example.test": "store3", "carol@example.test": "store1"}
    nodes = {r[1]: r[2:] for r in records if r[0] == "node"}
    assert nodes["store2"] == ["mailstore", "10.77.0.32", "standby"]  # store1's backup: no mail until it takes over
    assert nodes["store3"] == ["mailstore", "10.77.0.33", "active"]
    assert nodes["filter2"] == ["filter", "10.77.0.22", "active"]
    assert ["backup", "store1", "store2"] in records
    creds = node_credentials(site, site.node("filter2"), None, Secrets(tmp_path))
    assert creds["mailcluster.node"] == b"filter2 filter 10.77.0.22\n"


def certificate(cert: bytes) -> str:
    with tempfile.NamedTemporaryFile("wb", suffix="-cert.pub") as fh:
        fh.write(cert)
        fh.flush()
        return subprocess.run(["ssh-keygen", "-L", "-f", fh.name], check=True, capture_output=True, text=True).stdout


def fingerprint(key: bytes) -> str:
    r = subprocess.run(["ssh-keygen", "-l", "-f", "/dev/stdin"], input=key, check=True, capture_output=True)
    return r.stdout.split()[1].decode()


def test_each_node_speaks_with_its_own_key_certified_for_its_name_role_and_address(tmp_path):
    """No key shared by the site's nodes: each gets its own, and a certificate from the
    site's node CA that names it, its role, and the one address it may use. The CA's
    private key stays in the secrets: no node (no disk, no ESP) can certify another."""
    site, secrets = site_with(), Secrets(tmp_path)
    creds = {n.name: node_credentials(site, n, None, secrets) for n in site.nodes}
    keys = {c["mailcluster.cluster-key"] for c in creds.values()}
    assert len(keys) == len(site.nodes) and all(k.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----") for k in keys)
    for node in site.nodes:
        c = creds[node.name]
        cert = certificate(c["mailcluster.cluster-cert"])
        assert f'Key ID: "{node.name}:{node.role}"' in cert
        assert re.search(rf"Principals: \n\s+{node.name}\n\s+Critical Options: \n\s+source-address {node.address}/32\n", cert), cert
        assert "Extensions: (none)" in cert  # no terminal, no forwarding, even before `restrict`
        assert f"Signing CA: ED25519 {fingerprint(c['mailcluster.node-ca'])} " in cert
        assert f"Public key: ED25519-CERT {fingerprint(public_key(c['mailcluster.cluster-key'].decode()).encode())}" in cert
        held = [public_key(v.decode()) for v in c.values() if v.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")]
        assert held and secrets.node_ca_public() not in held
    # The same again for the same node: re-making credentials (a re-flash) changes nothing.
    assert node_credentials(site, site.node("fe1"), None, secrets) == creds["fe1"]
    # A node moved to another address gets a certificate for that address.
    moved = site_with(lambda d: next(n for n in d["nodes"] if n["name"] == "fe1").update(address="10.77.0.11"))
    assert "source-address 10.77.0.11/32" in certificate(
        node_credentials(moved, moved.node("fe1"), None, secrets)["mailcluster.cluster-cert"])


def test_images_do_not_depend_on_the_cluster_members(profiles, tmp_path):
    """Adding a node to the site rebuilds nothing: the running nodes' images stay valid,
    and the new node learns the cluster (and the cluster it) at boot."""
    site = site_with()
    grown = site_with(lambda d: d["nodes"].extend([{"name": "filter3", "role": "filter", "address": "10.77.0.23"},
                                                   {"name": "store3", "role": "mailstore", "address": "10.77.0.33"}]))
    for role in ("frontend", "filter", "mailstore"):
        a = render(Plan.of(profiles, site, role), tmp_path / "a" / role, Path("/c"), Path("/p"))
        b = render(Plan.of(profiles, grown, role), tmp_path / "b" / role, Path("/c"), Path("/p"))
        assert tree_hash(a) == tree_hash(b), role


def test_frontend_limits_and_backends_come_from_the_site(profiles, tmp_path):
    site = site_with(lambda d: d["frontend"].update(rate_limit={"connections": 7, "period": "30s"}))
    cfg = rendered(profiles, site, "frontend", tmp_path, "usr/lib/mailcluster/haproxy.cfg.in")
    assert "store conn_rate(30s)" in cfg and "sc0_conn_rate gt 7" in cfg
    filters = cfg[cfg.index("\nbackend filters_25"):].split("\n\n")[0]
    # the servers are the cluster's filters at boot and as they join (mailcluster-members)
    assert re.findall(r"^#@servers .*$", filters, re.M) == ["#@servers filter 25"]
    assert "default-server send-proxy-v2 check" in filters
    assert "src 10.77.0.0/24" in cfg  # stats: admin network only


def test_dns_records_for_both_topologies():
    site = site_with(lambda d: d["nodes"][0].update(public_address="192.0.2.10"))
    zone = dns.records(site)
    assert re.search(r"^example\.test\.\s+IN MX\s+10 fe1\.example\.test\.$", zone, re.M)
    assert re.search(r"^fe1\.example\.test\.\s+IN A\s+192\.0\.2\.10$", zone, re.M)
    rr = site_with(lambda d: d.update(nodes=[n for n in d["nodes"] if n["role"] != "frontend"]))
    zone = dns.records(rr)
    assert re.search(r"^example\.test\.\s+IN MX\s+10 mx\.example\.test\.$", zone, re.M)
    assert re.findall(r"^mx\.example\.test\.\s+IN A\s+(\S+)", zone, re.M) == ["10.77.0.21", "10.77.0.22"]
    with pytest.raises(ConfigError, match="only accept connections through"):
        dns.records(site, "round-robin")


def test_submission_through_the_frontend_lands_on_a_proxied_mailstore_port(profiles, tmp_path):
    site = site_with(lambda d: d["frontend"].update(ports=[25, 465, 587]))
    cfg = rendered(profiles, site, "frontend", tmp_path, "usr/lib/mailcluster/haproxy.cfg.in")
    for public, internal in ((465, 10465), (587, 10587)):
        backend = cfg[cfg.index(f"\nbackend mailstores_{public}"):].split("\n\n")[0]
        # active mailstores only: a backup holds no mailboxes until it takes over
        assert re.findall(r"^#@servers .*$", backend, re.M) == [f"#@servers mailstore {internal} active"]
    master = rendered(profiles, site, "mailstore", tmp_path, "etc/postfix/master.cf")
    for internal in ("10465", "10587"):
        block = master[master.index(f"\n{internal} "):].split("\n\n")[0]
        assert "smtpd_upstream_proxy_protocol=haproxy" in block and "smtpd_sasl_auth_enable=yes" in block
    nft = rendered(profiles, site, "mailstore", tmp_path, "etc/nftables.conf")
    # from the frontends only, and nowhere else
    assert re.findall(r"^\s*(.*tcp dport 10[45]\d\d.*)$", nft, re.M) == [
        'ip saddr @frontends tcp dport 10465 accept comment "submissions-proxied from frontends"',
        'ip saddr @frontends tcp dport 10587 accept comment "submission-proxied from frontends"']
