"""Images follow the Debian archive: a published package is a new input, a re-signed but
unchanged archive is not."""
import re
from pathlib import Path

import pytest

from appliance import archive
from appliance import paths as appliance_paths
from appliance.errors import BuildError
from appliance.imagebuild import Builder

INRELEASE = """\
-----BEGIN PGP SIGNED MESSAGE-----
Hash: SHA256

Origin: Debian
Suite: stable-security
Codename: trixie-security
Date: {date}
SHA256:
 {other} 1234 main/binary-arm64/Packages.xz
 {index} 5678 main/binary-amd64/Packages.xz
 {other} 910 main/source/Sources.xz
-----BEGIN PGP SIGNATURE-----
"""


def state(index: str, date: str = "Sat, 28 Nov 2026 10:00:00 UTC") -> archive.ArchiveState:
    text = INRELEASE.format(date=date, index=index, other="f" * 64)
    return archive.ArchiveState({s: archive.parse_inrelease(text, "http://x/InRelease") for _, s in archive.SUITES})


def test_inrelease_gives_the_amd64_package_index_and_date():
    got = state("a" * 64).suites["trixie-security"]
    assert got == {"date": "Sat, 28 Nov 2026 10:00:00 UTC", "packages_sha256": "a" * 64}


def test_a_page_that_is_not_an_inrelease_is_an_error():
    with pytest.raises(BuildError, match="not a Debian InRelease file"):
        archive.parse_inrelease("<html>captive portal</html>", "http://deb.debian.org/debian/dists/trixie/InRelease")


def test_new_packages_change_the_image_input_and_a_new_signature_date_does_not(profiles, site, monkeypatch, tmp_path):
    builder = Builder(profiles, site, log=lambda m: None, build_root=tmp_path)

    def digest(st: archive.ArchiveState) -> str:
        builder._archive = st
        return builder.render("filter")[1]

    before = digest(state("a" * 64))
    assert digest(state("a" * 64, date="Sun, 29 Nov 2026 04:00:00 UTC")) == before
    assert digest(state("b" * 64)) != before


def test_the_cache_is_refreshed_when_it_was_built_from_another_state(tmp_path):
    old, new = state("a" * 64), state("b" * 64)
    assert not archive.cache_is_from(tmp_path, old)  # no record: never trusted
    archive.record_cache_state(tmp_path, old)
    assert archive.cache_is_from(tmp_path, old)
    assert not archive.cache_is_from(tmp_path, new)


def test_the_pin_is_what_every_build_of_the_run_sees(monkeypatch):
    pinned = state("c" * 64)
    monkeypatch.setenv(archive.PIN_ENV, pinned.to_json())
    assert archive.current().token == pinned.token


def test_every_role_carries_one_shared_initrd_that_follows_the_archive(profiles, site, tmp_path):
    """mkosi would build its default initrd again in every build; the builder makes one,
    from mkosi's own initrd configuration, and every role's image names it. A published
    package is a new initrd, and so a new image."""
    builder = Builder(profiles, site, log=lambda m: None, build_root=tmp_path)
    builder._archive = state("a" * 64)
    named = {role: re.search(r"^Initrds=(.+)$", (builder.render(role)[0] / "mkosi.conf").read_text(), re.M)
             for role in profiles.roles}
    assert all(named.values()), f"a role's mkosi.conf names no initrd: {named}"
    paths = {m.group(1) for m in named.values()}
    assert len(paths) == 1, paths
    initrd = Path(paths.pop())
    assert initrd == builder.initrd_path() and initrd.parent.parent == appliance_paths.INITRDS
    config = (tmp_path / ".initrd" / "mkosi.conf").read_text()
    assert "Include=mkosi-initrd" in config and "Release=trixie" in config

    later = Builder(profiles, site, log=lambda m: None, build_root=tmp_path)
    later._archive = state("b" * 64)
    assert later.initrd_path() != initrd
