"""Every site value that reaches a file has a strict grammar; a bad site file gets one
clear error naming the file and the key (or the byte offset), never a traceback."""
import os
import subprocess

import pytest

from appliance.plan import Plan
from appliance import paths
from appliance.errors import ConfigError
from appliance.render import render
from appliance.profiles import ProfileSet
from appliance.site import load_site
from appliance.credentials import Secrets, node_credentials
from tests.tools import build_py as cli, script_lib
from tests.unit.test_site import ROLES, error_of, write_site

# A real SHA512-CRYPT hash (fixed: xdist workers must collect the same parameters).
SHA = ("$6$rounds=200000$M7ifU0BwdImxQBjS$zqD6MTFAHy.VyiYknAPn3fgXbdZIurxe.T7RJdtPi7NjY87SG3iCOLexGcapNyI5bXjChxgP68"
       "CekQhuHaZ5r.")


@pytest.mark.parametrize("value", [
    "{SHA512-CRYPT}" + SHA + "\n",                       # a trailing newline used to pass
    "{SHA512-CRYPT}" + SHA + ":::::userdb_home=/etc",    # passdb/userdb fields injected
    "{SHA512-CRYPT}" + SHA + "\nmallory@example.test:{PLAIN}x",
    "{SHA512-CRYPT}$6$short$abc",
    "{PLAIN}secret",
    "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$c2FsdA$aGFzaA:x",
])
def test_password_hash_must_be_one_whole_hash(tmp_path, value):
    msg = error_of(tmp_path, lambda d: d["users"][0].update(password_hash=value))
    assert "users[0].password_hash: expected a strong hash" in msg


def test_well_formed_hashes_of_each_scheme_are_accepted(tmp_path):
    good = ["{SHA512-CRYPT}" + SHA,
            "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo",
            "{BLF-CRYPT}$2b$05$0VMu.lmZPR0LMO8qg/Pn0OPwjiVryxUKySj.AjxUSyGXfR9QwyAse"]
    p = write_site(tmp_path, lambda d: [u.update(password_hash=h) for u, h in zip(d["users"], good)])
    assert [u.password_hash for u in load_site(p, ROLES).users] == good


@pytest.mark.parametrize("key,value,expect", [
    ("extra_packages", ["less\n[Content]\nPostInstallationScripts=/tmp/x"], "image.extra_packages[0]"),
    ("extra_packages", ["Less"], "image.extra_packages[0]"),
    ("extra_packages", ["-o"], "image.extra_packages[0]"),
    ("kernel_command_line", ["quiet\n[Host]"], "image.kernel_command_line[0]"),
    ("kernel_command_line", ["a b"], "image.kernel_command_line[0]"),
    ("kernel_command_line", ['init="/bin/sh"'], "image.kernel_command_line[0]"),
])
def test_image_settings_cannot_inject_mkosi_settings(tmp_path, key, value, expect):
    msg = error_of(tmp_path, lambda d: d["image"].update({key: value}))
    assert expect in msg


def test_the_renderer_refuses_a_line_break_whatever_let_it_through(tmp_path):
    """Defence in depth: the mkosi writer itself refuses what would start a new line."""
    from appliance.render import _ini
    with pytest.raises(ConfigError, match="line break"):
        _ini({"Content": {"Packages": ["less\nPostInstallationScripts=/x"]}})
    with pytest.raises(ConfigError, match="separator"):
        _ini({"Content": {"Packages": ["a,b"]}})


@pytest.mark.parametrize("schedule", ["every hour", "hourly\nrecent=0", "*-*-* 25:00:00", "Mon..Fry"])
def test_backup_schedule_is_checked_by_systemds_calendar_parser(tmp_path, schedule):
    msg = error_of(tmp_path, lambda d: d["backups"][0].update(schedule=schedule))
    assert "backups[0].schedule" in msg


def test_valid_calendars_pass(tmp_path):
    for schedule in ("daily", "*-*-* 02:30:00", "Mon..Fri 22:00", "*:0/15"):
        p = write_site(tmp_path, lambda d: d["backups"][0].update(schedule=schedule))
        assert load_site(p, ROLES).backups[0].schedule == schedule


@pytest.mark.parametrize("path,value", [
    (("filter", "reject_score"), float("nan")),
    (("filter", "reject_score"), -1e308),
    (("filter", "reject_score"), float("inf")),
    (("filter", "reject_score"), 0),
    (("retention", "daily"), 10**30),
    (("retention", "recent"), 2**63),
    (("filter", "queue_lifetime"), "99999999999999999999d"),
    (("image", "data_size"), "99999999999999999999G"),
    (("frontend", "rate_limit", "connections"), 10**12),
])
def test_numbers_are_finite_and_bounded(tmp_path, path, value):
    def mutate(d):
        node = d
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    msg = error_of(tmp_path, mutate)
    assert ".".join(path) in msg


def test_settings_the_images_would_ignore_are_refused_with_a_hint(tmp_path):
    msg = error_of(tmp_path, lambda d: d["filter"].update(engine="spamassassin"))
    assert "filter.engine" in msg and "use 'rspamd'" in msg


@pytest.mark.parametrize("mutate,expect", [
    (lambda d: d["nodes"][0].update(address="10.77.0.0"), "nodes[0].address: 10.77.0.0 is the network address"),
    (lambda d: d["nodes"][0].update(address="10.77.0.255"), "nodes[0].address: 10.77.0.255 is the broadcast address"),
    (lambda d: d["network"].update(gateway="192.0.2.1"), "network.gateway: 192.0.2.1 is outside network.cluster"),
    (lambda d: d["network"].update(admin="0.0.0.0/0"), "network.admin: 0.0.0.0/0 would admit"),
    (lambda d: d["backups"].append({"primary": "store1", "backup": "store2"}), "backups[1].primary: 'store1' is already"),
])
def test_network_and_pairing_mistakes_name_the_key(tmp_path, mutate, expect):
    assert expect in error_of(tmp_path, mutate)


def test_duplicate_keys_are_an_error_not_the_last_one_winning(tmp_path):
    p = tmp_path / "site.yaml"
    p.write_text(paths.EXAMPLE_SITE.read_text() + "\ndomain: evil.test\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'domain' \(first at line \d+\)"):
        load_site(p, ROLES)


def bad_files(tmp_path):
    (tmp_path / "binary.yaml").write_bytes(b"name: ex\xffample\n")
    (tmp_path / "nul.yaml").write_bytes(b"name: ex\x00ample\n")
    (tmp_path / "deep.yaml").write_text("name: " + "[" * 100_000 + "]" * 100_000 + "\n")
    (tmp_path / "huge.yaml").write_text("# " + "x" * (2 << 20) + "\n")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    os.mkfifo(tmp_path / "fifo.yaml")
    (tmp_path / "dir.yaml").mkdir()
    return {
        "binary.yaml": "byte offset 8: not UTF-8",
        "nul.yaml": "byte offset 8: control character",
        "deep.yaml": "nested deeper than",
        "huge.yaml": "larger than 1024 KiB",
        "list.yaml": "expected a mapping at the top level",
        "fifo.yaml": "not a regular file",
        "dir.yaml": "a directory",
    }


def test_bad_files_get_one_clear_error_and_no_traceback(tmp_path):
    for name, expect in bad_files(tmp_path).items():
        with pytest.raises(ConfigError) as exc:
            load_site(tmp_path / name, ROLES)
        assert exc.value.message.startswith(f"{tmp_path / name}: "), exc.value.message
        assert expect in exc.value.message, (name, exc.value.message)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_site(paths.Path("/dev/zero"), ROLES)


def test_check_lists_every_problem_offline(tmp_path):
    p = write_site(tmp_path, lambda d: (d["nodes"][1].update(address="not-an-ip"),
                                        d["filter"].update(reject_score=-1),
                                        d["backups"][0].update(schedule="every hour")))
    r = cli("--site", str(p), "check")
    assert r.returncode == 2
    for key in ("nodes[1].address", "filter.reject_score", "backups[0].schedule"):
        assert key in r.stderr, r.stderr
    ok = cli("check")
    assert ok.returncode == 0 and "example" in ok.stdout, ok.stderr
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    r = cli("--site", str(fifo), "check")  # would hang if the FIFO were opened for reading
    assert r.returncode == 2 and "Traceback" not in r.stderr and "not a regular file" in r.stderr


def test_time_servers_reach_timesyncd_and_bad_ones_are_refused(tmp_path):
    p = write_site(tmp_path, lambda d: d.update(time={"servers": ["ntp.example.test", "192.0.2.123"]}))
    ps = ProfileSet.load()
    out = render(Plan.of(ps, load_site(p, ROLES), "filter"), tmp_path / "b",
                 tmp_path / "c", tmp_path / "p")
    conf = next(out.glob("trees/*/10-base/etc/systemd/timesyncd.conf.d/50-mailcluster.conf")).read_text()
    assert "\nNTP=ntp.example.test 192.0.2.123\n" in conf
    msg = error_of(tmp_path, lambda d: d.update(time={"servers": ["ntp.example.test\nFallbackNTP=evil"]}))
    assert "time.servers[0]" in msg


def test_resolvers_reach_every_node_as_a_credential_and_bad_ones_are_refused(tmp_path):
    """Every node's /etc/resolv.conf, written at boot from its credential (identity):
    changing the resolvers makes new credentials, not new images."""
    p = write_site(tmp_path, lambda d: d["network"].update(resolvers=["192.0.2.53", "198.51.100.53"]))
    site = load_site(p, ROLES)
    lib = script_lib(tmp_path / "lib", "filter")
    for node in site.nodes:
        cred = tmp_path / f"{node.name}.resolvers"
        cred.write_bytes(node_credentials(site, node, None, Secrets(tmp_path / "secrets"))["mailcluster.resolvers"])
        conf = resolv_conf(lib, cred)
        assert [l for l in conf.stdout.splitlines() if not l.startswith("#")] == [
            "nameserver 192.0.2.53", "nameserver 198.51.100.53", "options trust-ad"], node.name
    # A site without resolvers: the node resolves nothing (and is told so in the file).
    (tmp_path / "none").write_text("")
    assert "nameserver" not in resolv_conf(lib, tmp_path / "none").stdout
    # What the script refuses, should a credential be made by hand.
    for bad in ("192.0.2.53\noptions debug\n", "192.0.2.1\n192.0.2.2\n192.0.2.3\n192.0.2.4\n"):
        (tmp_path / "bad").write_text(bad)
        r = resolv_conf(lib, tmp_path / "bad", check=False)
        assert r.returncode == 1 and "bad resolver" in r.stdout, r
    msg = error_of(tmp_path, lambda d: d["network"].update(resolvers=["192.0.2.53\noptions debug"]))
    assert "network.resolvers[0]" in msg
    msg = error_of(tmp_path, lambda d: d["network"].update(resolvers=["192.0.2.1", "192.0.2.2", "192.0.2.3",
                                                                         "192.0.2.4"]))
    assert "network.resolvers" in msg


def resolv_conf(lib, credential, check: bool = True) -> subprocess.CompletedProcess:
    """identity's resolv.conf from a mailcluster.resolvers credential (members.sh)."""
    r = subprocess.run(["bash", "-c", '. "$MC_LIB/members.sh"; resolv_conf "$1"', "-", str(credential)],
                       env={**os.environ, "MC_LIB": str(lib)}, capture_output=True, text=True)
    assert not check or r.returncode == 0, r
    return r
