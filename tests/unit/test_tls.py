"""The site's own certificate: checked when the site file loads, delivered only to the
nodes that terminate TLS, installed by each at boot (replacing an older one, and giving
way to a self-signed one again when the site drops it)."""
import datetime
import os
import subprocess

import pytest
import yaml

from appliance import paths, tls
from appliance.credentials import TLS_ROLES, Secrets, node_credentials
from appliance.errors import ConfigError
from appliance.plan import Plan
from appliance.profiles import ProfileSet
from appliance.site import load_site
from tests.tools import build_py, script_lib, site_certificate

GENERATE = paths.OVERLAYS / "25-tls/usr/libexec/mailcluster/tls-generate"
ROLES = ProfileSet.load().roles


def site_with_tls(tmp_path, certificate, key):
    data = yaml.safe_load(paths.EXAMPLE_SITE.read_text())
    data["tls"] = {"certificate": str(certificate), "key": str(key)}
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return site_certificate(tmp_path_factory.mktemp("cert"), ["mx.example.org", "*.example.org"])


def test_a_site_certificate_loads_relative_to_the_site_file(tmp_path, cert):
    chain, key, _ = cert
    (tmp_path / "tls").mkdir()
    for f in (chain, key):
        (tmp_path / "tls" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "tls" / key.name).chmod(0o600)
    site = load_site(site_with_tls(tmp_path, f"tls/{chain.name}", f"tls/{key.name}"), ROLES)
    loaded = site.site_certificate()
    assert loaded.names == ("mx.example.org", "*.example.org")
    assert loaded.covers("fe1.example.org") and not loaded.covers("example.org")
    # The fingerprint a client computes (openssl, independently of the code under test).
    out = subprocess.run(["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(chain)],
                         capture_output=True, text=True, check=True).stdout
    assert loaded.fingerprint == out.split("=", 1)[1].strip().replace(":", "").lower()


def refusal(tmp_path, certificate, key) -> str:
    with pytest.raises(ConfigError) as e:
        load_site(site_with_tls(tmp_path, certificate, key), ROLES)
    return str(e.value)


def test_a_key_of_another_certificate_is_refused(tmp_path, cert):
    _, other_key, _ = site_certificate(tmp_path / "other", ["mx.example.org"])
    msg = refusal(tmp_path, cert[0], other_key)
    assert f"{other_key}: this key does not belong to the certificate in {cert[0]}" in msg


def test_a_key_others_can_read_is_refused_with_the_fix(tmp_path, cert):
    _, key, _ = site_certificate(tmp_path / "c", ["mx.example.org"])
    key.chmod(0o644)
    assert f"hint: chmod 600 {key}" in refusal(tmp_path, cert[0], key)


def test_a_missing_file_a_key_as_certificate_and_half_a_pair_are_refused(tmp_path, cert):
    chain, key, _ = cert
    assert f"{tmp_path}/nope.pem: certificate not found" in refusal(tmp_path, tmp_path / "nope.pem", key)
    assert "expected PEM certificates only" in refusal(tmp_path, key, key)
    data = yaml.safe_load(paths.EXAMPLE_SITE.read_text())
    data["tls"] = {"certificate": str(chain)}
    (tmp_path / "half.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="tls.certificate and tls.key go together"):
        load_site(tmp_path / "half.yaml", ROLES)


def test_an_expired_certificate_is_refused(cert):
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=31)
    with pytest.raises(ConfigError, match="the certificate expired on"):
        tls.load(cert[0], cert[1], now=later)


def test_only_the_nodes_that_terminate_tls_receive_the_key(tmp_path, cert):
    """The filters and mailstores serve the site's certificate; the frontends, which
    pass mail's TLS through, never get its key."""
    site = load_site(site_with_tls(tmp_path, cert[0], cert[1]), ROLES)
    profiles = ProfileSet.load()
    assert {n.role for n in site.nodes} - set(TLS_ROLES) == {"frontend"}
    for node in site.nodes:
        creds = node_credentials(site, node, None, Secrets(tmp_path / "secrets"))
        if node.role in TLS_ROLES:
            assert "mailcluster-tls.service" in Plan.of(profiles, site, node.role).services.enable
            assert creds["mailcluster.tls-cert"] == cert[0].read_bytes()
            assert creds["mailcluster.tls-key"] == cert[1].read_bytes()
        else:
            assert not any(k.startswith("mailcluster.tls") for k in creds), node.name


def generate(tmp_path, creds: dict[str, bytes] | None):
    lib = tmp_path / "lib"
    if not lib.exists():
        script_lib(lib, "filter")
    cdir = tmp_path / "creds"
    if cdir.exists():
        for f in cdir.iterdir():
            f.unlink()
    cdir.mkdir(exist_ok=True)
    for name, value in (creds or {}).items():
        (cdir / name).write_bytes(value)
    env = {**os.environ, "CREDENTIALS_DIRECTORY": str(cdir), "MC_TLS_DIR": str(tmp_path / "tls"),
           "MC_LIB": str(lib)}
    r = subprocess.run(["bash", str(GENERATE)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    state = tmp_path / "tls"
    return r.stdout.strip(), (state / "cert.pem").read_bytes(), (state / "source").read_text().strip()


def test_a_node_follows_the_site_certificate_through_renewal_and_removal(tmp_path, cert):
    said, own, source = generate(tmp_path, None)
    assert source == "self-signed" and "generated a self-signed TLS certificate" in said
    assert generate(tmp_path, None)[1] == own  # kept across boots

    site_creds = {"mailcluster.tls-cert": cert[0].read_bytes(), "mailcluster.tls-key": cert[1].read_bytes()}
    said, installed, source = generate(tmp_path, site_creds)
    assert (said, installed, source) == ("installed the site's TLS certificate", cert[0].read_bytes(), "site")
    assert oct((tmp_path / "tls/key.pem").stat().st_mode & 0o777) == "0o600"
    assert generate(tmp_path, site_creds)[0] == "using the site's TLS certificate (unchanged)"

    renewed = site_certificate(tmp_path / "renewed", ["mx.example.org"])
    said, installed, _ = generate(tmp_path, {"mailcluster.tls-cert": renewed[0].read_bytes(),
                                             "mailcluster.tls-key": renewed[1].read_bytes()})
    assert installed == renewed[0].read_bytes() and (tmp_path / "tls/key.pem").read_bytes() == renewed[1].read_bytes()

    # The site dropped its certificate: the node makes its own again, not keep the site's.
    said, installed, source = generate(tmp_path, None)
    assert source == "self-signed" and installed not in (own, renewed[0].read_bytes())


def test_build_py_run_says_which_certificate_the_nodes_use(tmp_path, cert):
    r = build_py("--site", str(site_with_tls(tmp_path, cert[0], cert[1])), "show", "filter")
    assert r.returncode == 0, r.stderr
    assert "tls: the site's certificate for mx.example.org, *.example.org" in r.stdout
    r = build_py("show", "filter")
    assert "tls: self-signed" in r.stdout
