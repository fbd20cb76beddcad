"""The plan (appliance/plan.py): one place for each fact about an image, read by the
renderer, the CLI and the images' scripts. A new role is a profile, nothing more."""
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from appliance import archive, paths
from appliance.errors import ConfigError
from appliance.plan import Plan
from appliance.profiles import ProfileSet
from appliance.render import render
from appliance.site import load_site
from tests.tools import build_py, script_lib

BASE = paths.OVERLAYS / "10-base"

# A fourth role as a team would add it: one profile that declares one port, reachable
# only by the active mailstores.
ARCHIVE = """\
description: archive - keeps a copy of every mailbox, for the mailstores only
kind: role
parents: [hardened]
ports:
  archive: {port: 4190, allow: [mailstores]}
"""


@pytest.fixture
def with_archive(tmp_path):
    """The profiles with the archive role, and the example site with an archive node."""
    profile_dir = tmp_path / "profiles"
    shutil.copytree(paths.PROFILES, profile_dir)
    (profile_dir / "archive.yaml").write_text(ARCHIVE)
    profiles = ProfileSet.load(profile_dir, paths.OVERLAYS)
    site_file = tmp_path / "site.yaml"
    site_file.write_text(paths.EXAMPLE_SITE.read_text().replace(
        "  - {name: store2, role: mailstore, address: 10.77.0.32}\n",
        "  - {name: store2, role: mailstore, address: 10.77.0.32}\n"
        "  - {name: arch1, role: archive, address: 10.77.0.50}\n"))
    return profiles, load_site(site_file, profiles.roles)


def firewall(plan: Plan, dest: Path) -> str:
    out = render(plan, dest, Path("/c"), Path("/p"))
    return next(out.glob("trees/*/*/etc/nftables.conf")).read_text()


def test_a_fourth_role_is_one_profile_the_firewall_admits_as_declared(with_archive, tmp_path):
    profiles, site = with_archive
    assert profiles.roles == ["archive", "filter", "frontend", "mailstore"]
    own = firewall(Plan.of(profiles, site, "archive"), tmp_path / "archive")
    # Its port: from the active mailstores only; nothing else but what every node has.
    assert 'ip saddr @mailstores tcp dport 4190 accept comment "archive from mailstores"' in own
    assert "tcp dport { " not in own  # nothing open to the world
    # Every node keeps a set of the archive's members, so any role may admit it.
    for role in profiles.roles:
        assert "set archives { type ipv4_addr; }" in firewall(Plan.of(profiles, site, role), tmp_path / role)


def test_a_port_may_admit_only_a_role_that_exists(tmp_path):
    profile_dir = tmp_path / "profiles"
    shutil.copytree(paths.PROFILES, profile_dir)
    (profile_dir / "archive.yaml").write_text(ARCHIVE.replace("[mailstores]", "[mailstore]"))
    with pytest.raises(ConfigError) as e:
        ProfileSet.load(profile_dir, paths.OVERLAYS)
    assert "archive.yaml: ports.archive.allow: unknown source 'mailstore'" in e.value.message
    assert "mailstores" in e.value.hint


def run(script: Path, lib: Path, state: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True,
                          env={**os.environ, "MC_LIB": str(lib), "MC_STATE": str(state), **env})


def test_a_fourth_role_joins_and_its_members_fill_its_set(with_archive, tmp_path):
    profiles, site = with_archive
    state = tmp_path / "state"
    for d in ("inbox", "inbox.tmp"):
        (state / d).mkdir(parents=True)
    (state / "members").write_text("node store1 mailstore 10.77.0.31 active\n"
                                   "node store2 mailstore 10.77.0.32 standby\n")
    (state / "identity").write_text("arch1 archive 10.77.0.50\n")
    # A filter takes the archive node's own announcement, like any member's.
    flt = script_lib(tmp_path / "lib-filter", Plan.of(profiles, site, "filter"))
    r = run(BASE / "usr/libexec/mailcluster/join-request", flt, state, "arch1", "archive",
            SSH_CONNECTION="10.77.0.50 40000 10.77.0.21 22", SSH_ORIGINAL_COMMAND="join arch1 archive 10.77.0.50 active")
    assert r.returncode == 0, r.stderr
    assert [p.read_text() for p in (state / "inbox").iterdir()] == ["10.77.0.50 join arch1 archive 10.77.0.50 active\n"]
    # The archive node itself folds it in and applies the membership: its firewall's
    # member sets (nft is this test's, recording what it was given).
    arch = script_lib(tmp_path / "lib-archive", Plan.of(profiles, site, "archive"))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "nft").write_text(f"#!/bin/sh\ncat \"$2\" > {tmp_path}/nft-input\n")
    (bindir / "nft").chmod(0o755)
    r = run(BASE / "usr/libexec/mailcluster/members", arch, state, "inbox", PATH=f"{bindir}:{os.environ['PATH']}")
    assert r.returncode == 0, r.stderr
    assert "member arch1 (archive, 10.77.0.50, active) joined" in r.stdout
    assert "node arch1 archive 10.77.0.50 active" in (state / "members").read_text().splitlines()
    nft = (tmp_path / "nft-input").read_text()
    assert "add element inet filter archives { 10.77.0.50 }" in nft
    # A standby mailstore (a backup) is no member of the set its port admits.
    assert "add element inet filter mailstores { 10.77.0.31 }" in nft
    assert set(re.findall(r"flush set inet filter (\w+)", nft)) == {"archives", "filters", "frontends", "mailstores"}


def test_a_role_no_profile_defines_is_refused_in_a_record(tmp_path):
    lib = script_lib(tmp_path / "lib", "filter")
    r = subprocess.run(["bash", "-c", '. "$MC_LIB/members.sh"; check_record node arch1 archive 10.77.0.50 active'],
                       capture_output=True, text=True, env={**os.environ, "MC_LIB": str(lib), "MC_STATE": str(tmp_path)})
    assert r.stdout.strip() == "bad role 'archive' (filter frontend mailstore)"


def test_every_constant_a_script_reads_is_in_its_images_plan(profiles, site):
    """Shellcheck takes an upper-case name for the environment's: an MC_* constant that
    the plan does not define would be an empty string at run time, unseen."""
    defined = {role: set(re.findall(r"^(?:declare -gA )?(MC_\w+)=", Plan.of(profiles, site, role).constants(), re.M))
               for role in profiles.roles}
    checked = 0
    for role in profiles.roles:
        for layer in Plan.of(profiles, site, role).layers:
            for ov in layer.overlays:
                for f in (paths.OVERLAYS / ov).rglob("*"):
                    if not f.is_file() or f.suffix == ".md" or f.name.endswith(".j2"):
                        continue
                    used = set(re.findall(r"\$\{?(MC_(?:ROLES?|SET|PORT_[A-Z0-9_]+))\b", f.read_text(errors="replace")))
                    missing = used - defined[role]
                    assert not missing, f"{f.relative_to(paths.ROOT)} reads {sorted(missing)}, which {role}'s plan lacks"
                    checked += bool(used & defined[role])
    assert checked >= 3  # members.sh, members, requeue at least


def test_no_script_or_driver_writes_a_port_of_its_own():
    """The ports a peer is reached on come from the plan: a script that wrote one would
    go on using it after the profile changed."""
    literal = re.compile(r"(?<![\w.%-])(25|587|993|10025)(?![\w.%])")
    offenders = []
    for f in [*paths.OVERLAYS.rglob("*"), paths.ROOT / "appliance/vm.py"]:
        if f.is_file() and not f.name.endswith((".j2", ".md", ".conf", ".preset")):
            text = f.read_text(errors="replace")
            if f.suffix == ".py" or text.startswith("#!") or "# shellcheck shell=" in text:
                for n, line in enumerate(text.splitlines(), 1):
                    code = line.split("#", 1)[0] if not f.suffix == ".py" else line.split("  #", 1)[0]
                    if literal.search(code):
                        offenders.append(f"{f.relative_to(paths.ROOT)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_show_prints_the_plan_offline_with_the_site_applied(tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text(paths.EXAMPLE_SITE.read_text().replace("data_size: 2G", "data_size: 7G"))
    # The plan needs nothing from Debian's archive (--mkosi asks for its state, as a
    # build does): with an unreadable pinned state, asking would fail.
    r = build_py("--site", str(site), "show", "mailstore", "--json", env={archive.PIN_ENV: "unreadable"})
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["partitions"]["data"]["size_min"] == "7G"  # the site's, not the profile's
    assert doc["ports"]["submission-proxied"] == {"port": 10587, "allow": ["frontends"]}
    assert doc["image"] == str(paths.IMAGES / "example" / "mailstore.raw")
    assert "MC_PORT_FILTER_OUTBOUND=10025" in doc["constants"].splitlines()
