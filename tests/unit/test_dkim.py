"""DKIM and DMARC on the builder's side: each domain's key in the site's secrets, handed
to the filters only, and published by ./build.py dns in records a real verifier reads.
(The filters' own signatures are verified in tests/vm/test_inbound.py.)"""
import dkim
import pytest
import yaml

from appliance import dns, paths
from appliance.credentials import Secrets, node_credentials
from appliance.errors import ConfigError
from appliance.site import parse_site
from tests.tools import build_py, zone_txt

ROLES = ["filter", "frontend", "mailstore"]


def site_with(**changes):
    data = yaml.safe_load(paths.EXAMPLE_SITE.read_text())
    data.update(changes)
    return parse_site(data, "site.yaml", ROLES)


MESSAGE = (b"From: alice@example.test\r\nTo: friend@example.net\r\nSubject: hello\r\n"
           b"Message-ID: <1@example.test>\r\n\r\nSigned on the way out.\r\n")


@pytest.mark.parametrize("domain", ["example.test", "example.org"])
def test_a_signature_with_the_domains_key_verifies_against_the_printed_record(tmp_path, domain):
    site = site_with(domains=["example.org"])
    secrets = Secrets(tmp_path / "secrets")
    published = zone_txt(dns.records(site, None, secrets))
    selector = secrets.dkim_selector(domain)
    msg = MESSAGE.replace(b"example.test", domain.encode())
    signed = dkim.sign(msg, selector.encode(), domain.encode(), secrets.dkim_key(domain).encode(),
                       canonicalize=(b"relaxed", b"relaxed"))
    lookups = []

    def resolver(name, timeout=5):
        lookups.append(name.decode())
        return published.get(name.decode(), b"")

    assert dkim.verify(signed + msg, dnsfunc=resolver)
    assert lookups == [f"{selector}._domainkey.{domain}."]
    # ... and not against another domain's record
    other = "example.org" if domain == "example.test" else "example.test"
    assert not dkim.verify(signed + msg, dnsfunc=lambda name, timeout=5: published[f"{selector}._domainkey.{other}."])


def test_each_domain_has_its_own_key_kept_between_runs(tmp_path):
    site = site_with(domains=["example.org"])
    secrets = Secrets(tmp_path / "secrets")
    first = dns.dkim_records(site, secrets)
    assert len(set(first.values())) == 2
    assert dns.dkim_records(site, Secrets(tmp_path / "secrets")) == first  # made once, then read
    key = tmp_path / "secrets/dkim/example.test/mc1.key"
    assert oct(key.stat().st_mode & 0o777) == "0o600"


def test_only_the_filters_get_the_signing_keys(tmp_path):
    site, secrets = site_with(), Secrets(tmp_path / "secrets")
    for node in site.nodes:
        creds = node_credentials(site, node, None, secrets)
        dkim_creds = sorted(n for n in creds if n.startswith("mailcluster.dkim"))
        if node.role == "filter":
            assert dkim_creds == ["mailcluster.dkim-key.example.com", "mailcluster.dkim-key.example.test",
                                  "mailcluster.dkim-selectors"]
            assert creds["mailcluster.dkim-selectors"] == b"example.test mc1\nexample.com mc1\n"
            assert creds["mailcluster.dkim-key.example.test"].startswith(b"-----BEGIN PRIVATE KEY-----")
        else:
            assert dkim_creds == [], node.name


def test_dmarc_policy_and_reports_come_from_the_site(tmp_path):
    zone = zone_txt(dns.records(site_with(dmarc={"policy": "quarantine", "reports": "dmarc@example.test"}),
                                None, Secrets(tmp_path)))
    assert zone["_dmarc.example.test."] == b"v=DMARC1; p=quarantine; rua=mailto:dmarc@example.test"
    assert zone_txt(dns.records(site_with(), None, Secrets(tmp_path)))["_dmarc.example.test."] == b"v=DMARC1; p=none"
    with pytest.raises(ConfigError) as e:
        site_with(dmarc={"policy": "strict"})
    assert "dmarc.policy" in e.value.message


def test_build_py_dns_prints_every_record_as_a_zone_fragment():
    r = build_py("dns")
    assert r.returncode == 0, r.stderr
    txt = zone_txt(r.stdout)
    assert txt["example.test."].startswith(b"v=spf1 ")
    assert txt["mc1._domainkey.example.test."].startswith(b"v=DKIM1; k=rsa; p=MII")
    # no string of a TXT record is longer than DNS allows
    for line in r.stdout.splitlines():
        if "IN TXT" in line:
            assert all(len(s) <= 255 for s in line.split('"')[1::2]), line
