"""The CLI: one line per command in --help, clear messages and distinct exit codes."""
import subprocess
import sys


from appliance import paths

BUILD = [sys.executable, str(paths.ROOT / "build.py")]


def cli(*args, **kw):
    return subprocess.run([*BUILD, *args], capture_output=True, text=True, **kw)


def test_help_lists_every_command():
    out = cli("--help").stdout
    for cmd in ("setup", "build", "dns", "list", "show", "run"):
        assert any(line.strip().startswith(cmd + " ") for line in out.splitlines()), cmd


def test_list_shows_roles_and_contents():
    r = cli("list")
    assert r.returncode == 0
    assert "mailstore:" in r.stdout and "dovecot-imapd" in r.stdout and "base -> mailstore -> site" in r.stdout


def test_show_prints_resolved_configuration():
    r = cli("show", "frontend")
    assert r.returncode == 0, r.stderr
    assert "haproxy" in r.stdout and '"smtp": 25' in r.stdout and "10-base.conf" in r.stdout


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
