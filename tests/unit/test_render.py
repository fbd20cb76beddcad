"""Rendering: templates are strict, and the input hash tracks exactly the inputs."""
import shutil
from pathlib import Path

import pytest

from appliance import paths
from appliance.plan import Plan
from appliance.errors import ConfigError
from appliance.profiles import ProfileSet
from appliance.render import render, tree_hash
from appliance.site import load_site


@pytest.fixture
def tree(tmp_path):
    """A private copy of profiles/ and overlays/ to break at will."""
    shutil.copytree(paths.PROFILES, tmp_path / "profiles")
    shutil.copytree(paths.OVERLAYS, tmp_path / "overlays")
    return tmp_path


def render_role(tree, role="filter", dest=None):
    ps = ProfileSet.load(tree / "profiles", tree / "overlays")
    site = load_site(paths.EXAMPLE_SITE, ps.roles)
    dest = dest or tree / "build" / role
    return render(Plan.of(ps, site, role), dest, Path("/nonexistent/cache"), Path("/nonexistent/pkgs"))


def test_templates_render_from_the_site(tree):
    out = render_role(tree)
    main_cf = next(out.glob("trees/*/30-postfix/etc/postfix/main.cf"))
    assert "mydomain = example.test" in main_cf.read_text()
    assert not list(out.rglob("*.j2"))


def test_undefined_variable_names_template_and_line(tree):
    tpl = tree / "overlays/30-postfix/etc/postfix/main.cf.j2"
    lines = tpl.read_text().splitlines()
    lines.insert(3, "myhostname = {{ site.no_such_key }}")
    tpl.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as exc:
        render_role(tree)
    assert f"{tpl}:4:" in exc.value.message
    assert "no_such_key" in exc.value.message


def test_template_syntax_error_names_line(tree):
    tpl = tree / "overlays/40-frontend/usr/lib/mailcluster/haproxy.cfg.in.j2"
    tpl.write_text("global\n\tlog {{ site.name \n")
    with pytest.raises(ConfigError) as exc:
        render_role(tree, "frontend")
    assert f"{tpl}:2: template syntax error" in exc.value.message


def test_hash_is_stable_across_checkouts_and_tracks_changes(tree, tmp_path):
    a = tree_hash(render_role(tree, dest=tmp_path / "a"))
    b = tree_hash(render_role(tree, dest=tmp_path / "elsewhere" / "b"))
    assert a == b
    (tree / "overlays/50-filter/etc/rspamd/local.d/options.inc").write_text("# changed\n")
    assert tree_hash(render_role(tree, dest=tmp_path / "c")) != a


def test_site_change_changes_only_affected_output(tree, tmp_path):
    import yaml
    ps = ProfileSet.load(tree / "profiles", tree / "overlays")
    data = yaml.safe_load(paths.EXAMPLE_SITE.read_text())
    data["domain"] = "other.test"
    data["users"], data["aliases"] = [], []
    p = tmp_path / "other.yaml"
    p.write_text(yaml.safe_dump(data))
    site = load_site(p, ps.roles)
    out = render(Plan.of(ps, site, "filter"), tmp_path / "o", Path("/c"), Path("/p"))
    assert "mydomain = other.test" in next(out.glob("trees/*/30-postfix/etc/postfix/main.cf")).read_text()


def test_every_setting_lands_in_its_mkosi_section(tree):
    # mkosi ignores settings in the wrong section silently; the renderer refuses them.
    base = tree / "profiles/base.yaml"
    base.write_text(base.read_text().replace("mkosi:\n  Content:\n", "mkosi:\n  Content:\n    Incremental: 'yes'\n"))
    with pytest.raises(ConfigError, match=r"mkosi.Content.Incremental: belongs in section \[Host\]"):
        render_role(tree)
