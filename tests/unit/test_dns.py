"""./build.py dns: a zone fragment a DNS library parses, with TLSA and TLS-RPT when the
site asks for them; and --check, against a real resolver (dnsmasq) serving what was
printed, names each record that is missing or differs."""
import contextlib
import socket
import subprocess
from pathlib import Path

import pytest
import yaml
import dns.zone
from dns import rdatatype, resolver

from appliance import paths
from appliance.wait import retry
from tests.tools import build_py, site_certificate


def parse(zone: str) -> dict[tuple[str, str], list]:
    """The printed fragment, read by dnspython as a zone file: (name, type) -> rdatas."""
    parsed = dns.zone.from_text(zone, origin=".", relativize=False, check_origin=False)
    return {(name.to_text(), rdatatype.to_text(rdataset.rdtype)): list(rdataset)
            for name, node in parsed.nodes.items() for rdataset in node.rdatasets}


@pytest.fixture
def env(tmp_path):
    return {"MAILCLUSTER_SECRETS": str(tmp_path / "secrets")}


@pytest.fixture
def cert_site(tmp_path):
    chain, key, _ = site_certificate(tmp_path / "tls", ["mx.example.test", "*.example.test"])
    data = yaml.safe_load(paths.EXAMPLE_SITE.read_text())
    data["tls"] = {"certificate": str(chain), "key": str(key), "reports": "tls-reports@example.test"}
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, chain


def test_the_example_sites_records_parse_as_a_zone_fragment(env):
    r = build_py("dns", env=env)
    assert r.returncode == 0, r.stderr
    zone = parse(r.stdout)
    assert [rd.to_text() for rd in zone[("example.test.", "MX")]] == ["10 fe1.example.test."]
    # the filters' HELO names resolve to the addresses they send from (and SPF allows)
    assert [rd.to_text() for rd in zone[("filter1.example.test.", "A")]] == ["10.77.0.21"]
    # users reach their mailstore by its name; a standby backup is not published yet
    assert [rd.to_text() for rd in zone[("store1.example.test.", "A")]] == ["10.77.0.31"]
    assert ("store2.example.test.", "A") not in zone
    assert b"".join(zone[("mc1._domainkey.example.test.", "TXT")][0].strings).startswith(b"v=DKIM1; k=rsa; p=")
    assert not any(t == "TLSA" for _, t in zone)
    assert "No TLSA (DANE) records" in r.stdout


def test_a_site_certificate_gives_tlsa_and_reports_give_tls_rpt(cert_site, env):
    site, chain = cert_site
    r = build_py("--site", str(site), "dns", env=env)
    assert r.returncode == 0, r.stderr
    zone = parse(r.stdout)
    # The SPKI digest, computed here with openssl (not by the code under test).
    pub = subprocess.run(["openssl", "x509", "-noout", "-pubkey", "-in", str(chain)], capture_output=True,
                         check=True).stdout
    der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "DER"], input=pub, capture_output=True,
                         check=True).stdout
    digest = subprocess.run(["sha256sum"], input=der, capture_output=True, check=True).stdout.split()[0].decode()
    assert [rd.to_text() for rd in zone[("_25._tcp.fe1.example.test.", "TLSA")]] == [f"3 1 1 {digest}"]
    assert [b"".join(rd.strings) for rd in zone[("_smtp._tls.example.test.", "TXT")]] == [
        b"v=TLSRPTv1; rua=mailto:tls-reports@example.test"]


def dnsmasq_config(zone: dict[tuple[str, str], list], domains: list[str]) -> str:
    lines = [f"local=/{d}/" for d in domains]  # answer for these domains from here, NXDOMAIN if unknown
    for (name, rtype), rdatas in zone.items():
        name = name.rstrip(".")
        for rd in rdatas:
            if rtype == "MX":
                lines.append(f"mx-host={name},{rd.exchange.to_text().rstrip('.')},{rd.preference}")
            elif rtype == "A":
                lines.append(f"host-record={name},{rd.address}")
            elif rtype == "TXT":
                lines.append(f"txt-record={name}," + ",".join(f'"{s.decode()}"' for s in rd.strings))
            elif rtype == "TLSA":
                lines.append(f"dns-rr={name},52,{rd.to_wire().hex()}")
            else:
                raise AssertionError(f"no dnsmasq form for {rtype}")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def serving(tmp_path: Path, zone: dict, domains: list[str]):
    """dnsmasq on 127.0.0.1, answering only from `zone` (no upstream: nothing leaves);
    yields its ADDRESS:PORT."""
    conf = tmp_path / "dnsmasq.conf"
    conf.write_text(dnsmasq_config(zone, domains))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-poll",
                             "--bind-interfaces", "--listen-address=127.0.0.1", f"--port={port}", "--pid-file=",
                             f"--conf-file={conf}", "--log-facility=-"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        res = resolver.Resolver(configure=False)
        res.nameservers, res.port, res.lifetime = ["127.0.0.1"], port, 1.0

        def up(_last):
            if proc.poll() is not None:
                raise AssertionError(f"dnsmasq exited: {proc.stdout.read()}")
            try:
                return res.resolve(f"{domains[0]}.", "MX")
            except Exception:
                return None
        retry(up, timeout=30, interval=0.2)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_check_names_the_missing_dkim_record_and_a_differing_spf(tmp_path, env):
    printed = build_py("dns", env=env)
    assert printed.returncode == 0, printed.stderr
    zone = parse(printed.stdout)
    everything = dict(zone)

    with serving(tmp_path, everything, ["example.test"]) as at:
        r = build_py("dns", "--check", at, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok       mc1._domainkey.example.test. TXT v=DKIM1" in r.stdout
    assert "missing" not in r.stdout and "differs" not in r.stdout

    del zone[("mc1._domainkey.example.test.", "TXT")]
    spf, = parse('$TTL 60\nexample.test. IN TXT "v=spf1 ip4:192.0.2.1 -all"\n'
                 'example.test. IN TXT "google-site-verification=x"\n').values()
    zone[("example.test.", "TXT")] = spf
    with serving(tmp_path, zone, ["example.test"]) as at:
        r = build_py("dns", "--check", at, env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "missing  mc1._domainkey.example.test. TXT" in r.stdout
    assert ("differs  example.test. TXT: published 'v=spf1 ip4:192.0.2.1 -all'; "
            "needed 'v=spf1 ip4:10.77.0.21 ip4:10.77.0.22 -all'") in r.stdout
    assert "ok       example.test. MX" in r.stdout and "ok       _dmarc.example.test. TXT v=DMARC1" in r.stdout
    assert "2 of" in r.stderr and "missing or differ" in r.stderr


def test_check_refuses_a_bad_resolver_and_says_when_none_answers(tmp_path, env):
    r = build_py("dns", "--check", "resolver.example", env=env)
    assert r.returncode == 2 and "expected an IP address" in r.stderr
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))  # bound, never read: queries time out
        r = build_py("dns", "--check", f"127.0.0.1:{s.getsockname()[1]}", env=env)
    assert r.returncode != 0 and "gave no answer" in r.stderr, r.stderr
