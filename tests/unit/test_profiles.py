"""Layering base -> role -> extra layers -> site, merged by mkosi itself."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from appliance import paths
from appliance.plan import Plan
from appliance.errors import ConfigError
from appliance.imagebuild import HOST_PATH
from appliance.profiles import ProfileSet, resolved_partitions
from appliance.render import render
from appliance.site import load_site


@pytest.fixture
def tree(tmp_path):
    shutil.copytree(paths.PROFILES, tmp_path / "profiles")
    shutil.copytree(paths.OVERLAYS, tmp_path / "overlays")
    return tmp_path


def edit(path: Path, fn):
    data = yaml.safe_load(path.read_text())
    fn(data)
    path.write_text(yaml.safe_dump(data))


def test_roles_and_chain_order():
    ps = ProfileSet.load()
    assert ps.roles == ["filter", "frontend", "mailstore"]
    assert [p.name for p in ps.compose("mailstore", ["test"])] == ["base", "hardened", "mailstore", "test"]


def test_a_layer_is_not_a_role():
    with pytest.raises(ConfigError, match="'base' is a layer, not a role"):
        ProfileSet.load().compose("base")


def test_unknown_parent_and_cycles_are_reported(tree):
    edit(tree / "profiles/filter.yaml", lambda d: d.update(parents=["bsae"]))
    with pytest.raises(ConfigError, match=r"filter.yaml: parents: unknown profile 'bsae'"):
        ProfileSet.load(tree / "profiles", tree / "overlays")
    edit(tree / "profiles/filter.yaml", lambda d: d.update(parents=["base"]))
    edit(tree / "profiles/base.yaml", lambda d: d.update(parents=["filter"]))
    with pytest.raises(ConfigError, match="cycle"):
        ProfileSet.load(tree / "profiles", tree / "overlays")


def test_unknown_profile_key_and_missing_overlay(tree):
    edit(tree / "profiles/frontend.yaml", lambda d: d.update(pakages=["x"]))
    with pytest.raises(ConfigError, match=r"frontend.yaml: pakages: unknown key"):
        ProfileSet.load(tree / "profiles", tree / "overlays")
    edit(tree / "profiles/frontend.yaml", lambda d: (d.pop("pakages"), d.update(overlays=["99-none"])))
    with pytest.raises(ConfigError, match="no overlay directory"):
        ProfileSet.load(tree / "profiles", tree / "overlays")


def test_later_layers_win_and_lists_append(tree, tmp_path):
    """base sets, role overrides, site overrides last; mkosi's own merge is the judge."""
    edit(tree / "profiles/base.yaml", lambda d: d["mkosi"]["Content"].update(Hostname="from-base"))
    edit(tree / "profiles/filter.yaml", lambda d: d.update(
        mkosi={"Content": {"Hostname": "from-role"}},
        partitions={"data": {"order": 20, "type": "linux-generic", "format": "ext4", "size_min": "1G"}}))
    site_data = yaml.safe_load(paths.EXAMPLE_SITE.read_text())
    site_data["image"] = {"data_size": "3G", "extra_packages": ["less"], "kernel_command_line": ["quiet"]}
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(site_data))

    ps = ProfileSet.load(tree / "profiles", tree / "overlays")
    site = load_site(tmp_path / "site.yaml", ps.roles)
    out = render(Plan.of(ps, site, "filter"), tmp_path / "b",
                 tmp_path / "cache", tmp_path / "pkgs")
    summary = subprocess.run(["mkosi", "--directory", str(out), "--json", "summary"], capture_output=True,
                             text=True, env={**os.environ, "PATH": HOST_PATH}, check=True).stdout
    image = json.loads(summary)["Images"][0]
    assert image["Hostname"] == "from-role"                       # role beats base
    pk = image["Packages"]
    assert pk.index("linux-image-amd64") < pk.index("postfix") < pk.index("less")  # lists append in layer order
    assert image["KernelCommandLine"][-1] == "quiet"               # site appends last
    assert "SizeMinBytes=3G" in (out / "repart/20-data.conf").read_text()  # site beats role
    assert list(resolved_partitions(ps.compose("filter"))) == ["esp", "root", "data"]
