"""DKIM and DMARC on the builder's side: each domain's key in the site's secrets, handed
to the filters only, and published by ./build.py dns in records a real verifier reads.
(The filters' own signatures are verified in tests/vm/test_inbound.py.)"""
import dkim
import pytest
import yaml

from appliance import dns, paths
from appliance.credentials import Secrets, node_credentials
from appliance.errors import ApplianceError, ConfigError
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


def filters_sign(site, secrets, node="filter1") -> bytes:
    """A message signed as a filter would sign it: with the key and selector its
    credentials carry."""
    creds = node_credentials(site, site.node(node), None, secrets)
    selector = dict(line.split() for line in creds["mailcluster.dkim-selectors"].decode().splitlines())["example.test"]
    return dkim.sign(MESSAGE, selector.encode(), b"example.test", creds["mailcluster.dkim-key.example.test"],
                     canonicalize=(b"relaxed", b"relaxed")) + MESSAGE


def verifies(message: bytes, zone: str) -> bool:
    published = zone_txt(zone)
    return dkim.verify(message, dnsfunc=lambda name, timeout=5: published.get(name.decode(), b""))


def test_a_rotation_keeps_mail_signed_before_and_after_it_verifiable(tmp_path):
    from datetime import datetime, timedelta, timezone

    from appliance.dkim import rotate

    site, secrets, now = site_with(), Secrets(tmp_path / "secrets"), datetime(2026, 12, 6, tzinfo=timezone.utc)
    before = filters_sign(site, secrets)
    assert verifies(before, dns.records(site, None, secrets))

    said = rotate(secrets, "example.test", now)  # 1: publish the next key; the filters keep signing with mc1
    assert "made the next key mc2" in said
    zone = dns.records(site, None, secrets)
    assert {"mc1._domainkey.example.test.", "mc2._domainkey.example.test."} <= set(zone_txt(zone))
    assert b"s=mc1;" in filters_sign(site, secrets)

    with pytest.raises(ApplianceError, match="does not resolve to the next key yet"):
        rotate(secrets, "example.test", now, published=lambda selector: False)
    assert "sign with mc2" in rotate(secrets, "example.test", now, published=lambda selector: selector == "mc2")
    after = filters_sign(site, secrets)
    assert b"s=mc2;" in after
    zone = dns.records(site, None, secrets)  # what the operator publishes during the grace period
    assert verifies(before, zone) and verifies(after, zone)

    with pytest.raises(ApplianceError, match="stays published until 2026-12-13"):
        rotate(secrets, "example.test", now + timedelta(days=6))
    assert "retired mc1" in rotate(secrets, "example.test", now + timedelta(days=7))
    zone = dns.records(site, None, secrets)
    assert "mc1._domainkey.example.test." not in zone_txt(zone) and verifies(after, zone)
    assert not (tmp_path / "secrets/dkim/example.test/mc1.key").exists()
    assert "made the next key mc3" in rotate(secrets, "example.test", now + timedelta(days=8))


def test_build_py_dkim_rotate_and_status(tmp_path):
    env = {"MAILCLUSTER_SECRETS": str(tmp_path / "secrets")}
    r = build_py("dkim", "rotate", "example.test", env=env)
    assert r.returncode == 0 and "made the next key mc2" in r.stdout, r.stderr
    r = build_py("dkim", "status", env=env)
    assert "example.test: signing with mc1, next mc2 (published, not signing yet)" in r.stdout
    assert "example.com: signing with mc1\n" in r.stdout
    r = build_py("dkim", "rotate", "elsewhere.test", env=env)
    assert r.returncode == 2 and "'elsewhere.test' is not a domain of this site" in r.stderr
    (tmp_path / "secrets/example/dkim/example.test/selector").write_text("../../x\n")
    r = build_py("dkim", "status", env=env)
    assert r.returncode == 2 and "'../../x' is not a selector" in r.stderr
