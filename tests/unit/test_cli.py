"""The CLI: one line per command in --help, clear messages and distinct exit codes."""
import base64
import os
import stat
import struct


from appliance import paths
from tests.tools import build_py as cli


def test_help_lists_every_command():
    out = cli("--help").stdout
    for cmd in ("setup", "build", "dns", "credentials", "list", "show", "run"):
        assert any(line.strip().startswith(cmd + " ") for line in out.splitlines()), cmd


def test_list_shows_roles_and_contents():
    r = cli("list")
    assert r.returncode == 0
    assert "mailstore:" in r.stdout and "dovecot-imapd" in r.stdout and "base -> hardened -> mailstore -> site" in r.stdout


def test_show_prints_resolved_configuration():
    r = cli("show", "frontend")
    assert r.returncode == 0, r.stderr
    assert "haproxy" in r.stdout and '"smtp": {"port": 25, "allow": ["world"]}' in r.stdout
    assert "    MC_ROLE=frontend" in r.stdout.splitlines()  # the constants its scripts read
    # with --mkosi, also the rendered mkosi configuration
    r = cli("show", "frontend", "--mkosi")
    assert r.returncode == 0, r.stderr
    assert "  --- 10-base.conf" in r.stdout and "input_hash: " in r.stdout


def test_bad_site_file_exit_code_and_message(tmp_path):
    bad = tmp_path / "site.yaml"
    bad.write_text(paths.EXAMPLE_SITE.read_text().replace("role: frontend", "role: webmail"))
    r = cli("--site", str(bad), "build")
    assert r.returncode == 2
    assert f"error: {bad}: nodes[0].role: unknown role 'webmail'" in r.stderr
    assert "Traceback" not in r.stderr


def test_unknown_role_argument():
    r = cli("build", "webmail")
    assert r.returncode == 2
    assert "unknown role 'webmail'" in r.stderr


def test_run_without_image_says_what_to_do(tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text(paths.EXAMPLE_SITE.read_text().replace("name: example", "name: nothingbuilt"))
    r = cli("--site", str(site), "run", "filter")
    assert r.returncode == 1
    assert "no image built for role filter" in r.stderr and "./build.py build filter" in r.stderr


def test_dns_prints_the_zone_records():
    r = cli("dns")
    assert r.returncode == 0, r.stderr
    assert "IN MX\t10 fe1.example.test." in r.stdout
    r = cli("dns", "--topology", "round-robin")
    assert r.returncode == 2 and "hint:" in r.stderr


def oem_strings(table: bytes) -> dict[str, bytes]:
    """An SMBIOS type 11 structure read as the SMBIOS specification lays it out: the
    formatted part (type, length, handle, count), then NUL-terminated strings."""
    kind, length, _handle, count = struct.unpack_from("<BBHB", table)
    assert kind == 11 and length == 5
    strings = table[length:].split(b"\0")
    assert strings[count:] == [b"", b""]  # the structure ends with a double NUL
    out = {}
    for s in strings[:count]:
        if s.startswith(b"io.systemd.stub."):
            continue  # for systemd-stub, not a credential
        name, _, value = s.decode().removeprefix("io.systemd.credential.binary:").partition("=")
        out[name] = base64.b64decode(value)
    return out


def test_credentials_make_a_node_of_an_image(tmp_path):
    env = {**os.environ, "MAILCLUSTER_SECRETS": str(tmp_path / "secrets")}
    table = tmp_path / "filter2.smbios"
    r = cli("credentials", "filter2", "--output", str(table), env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"-smbios file={table}"
    assert stat.S_IMODE(table.stat().st_mode) == 0o600
    creds = oem_strings(table.read_bytes())
    assert creds["mailcluster.node"] == b"filter2 filter 10.77.0.22\n"
    assert b"node fe1 frontend 10.77.0.10 active" in creds["mailcluster.peers"]
    assert creds["system.hostname"] == b"filter2"
    again = cli("credentials", "filter2", "--output", str(table), env=env)
    assert again.returncode == 1 and "exists" in again.stderr

    out = tmp_path / "cred" / "store1"
    r = cli("credentials", "store1", "--format", "files", "--output", str(out), env=env)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    key = out / "mailcluster.mailstore-key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(key.read_text()) == 64
    # the same site secrets every time: a node's key must not change between calls
    assert (tmp_path / "secrets" / "example" / "nodes" / "store1" / "ecryptfs.passphrase").read_text() == key.read_text()
    again = cli("credentials", "store1", "--format", "files", "--output", str(out), env=env)
    assert again.returncode == 1 and "is not empty" in again.stderr and key.read_text() == (
        tmp_path / "secrets" / "example" / "nodes" / "store1" / "ecryptfs.passphrase").read_text()

    r = cli("credentials", "store9", "--output", str(tmp_path / "x"), env=env)
    assert r.returncode == 2 and "no node named 'store9'" in r.stderr and "known nodes:" in r.stderr
