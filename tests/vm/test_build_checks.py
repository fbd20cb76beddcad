"""A broken daemon template fails the build with the daemon's own message, and leaves
nothing half-built behind."""
import shutil

import pytest

from appliance import paths
from appliance.errors import BuildError
from appliance.imagebuild import Builder
from appliance.profiles import ProfileSet

# Its own group: a build needs no guest, so it runs beside the VM modules, not between them.
pytestmark = [pytest.mark.build, pytest.mark.xdist_group("build")]


def test_broken_postfix_template_fails_with_postfix_message(tmp_path, site):
    shutil.copytree(paths.PROFILES, tmp_path / "profiles")
    shutil.copytree(paths.OVERLAYS, tmp_path / "overlays")
    tpl = tmp_path / "overlays/30-postfix/etc/postfix/main.cf.j2"
    tpl.write_text(tpl.read_text() + "default_process_limit = {{ site.name }}-processes\n")
    ps = ProfileSet.load(tmp_path / "profiles", tmp_path / "overlays")
    builder = Builder(ps, site, log=print, build_root=tmp_path / "build", images_root=tmp_path / "images")
    _, digest = builder.render("filter")

    with pytest.raises(BuildError) as exc:
        builder.build("filter")

    msg = str(exc.value)
    assert "postfix check" in msg
    assert "bad numerical configuration: default_process_limit = example-processes" in msg
    assert "full mkosi log:" in msg
    assert not (tmp_path / "images").exists() or not list((tmp_path / "images").rglob("*.raw"))
    # nothing of this build in the store, complete or partial
    assert not (paths.STORE / digest).exists()
    assert not list(paths.STORE.glob(f".tmp-{digest}-*"))


def test_unchanged_inputs_build_nothing(profiles, site, test_images):
    """A second build of the same inputs reuses the store entry and leaves no debris."""
    builder = Builder(profiles, site, log=print)
    again = builder.build("frontend", ("test",))
    assert not again.built
    assert again.raw.samefile(test_images["frontend"])
    assert again.info["input_hash"] == again.input_hash
    assert not [p for p in again.raw.parent.iterdir() if p.name.startswith(".")]
    sums = (again.raw.parent / "SHA256SUMS").read_text()
    assert f"{again.info['image']['sha256']}  frontend-test.raw" in sums
