"""Host set-up: on a host it cannot install on, it lists what is needed instead of failing."""
import pytest

from appliance import host
from appliance.errors import ApplianceError


def test_unsupported_host_gets_a_list_not_a_traceback(monkeypatch):
    monkeypatch.setattr(host, "missing", lambda: [host.Need("mkosi", "mkosi", backports=True),
                                                   host.Need("vde_switch", "vde2")])
    monkeypatch.setattr(host, "os_release", lambda: {"ID": "fedora", "VERSION_ID": "41", "PRETTY_NAME": "Fedora 41"})
    with pytest.raises(ApplianceError) as exc:
        host.setup(log=lambda m: None)
    msg = str(exc.value)
    assert "unsupported host (Fedora 41)" in msg
    assert "mkosi (Debian 12: mkosi from bookworm-backports; Debian 13: mkosi)" in msg
    assert "vde_switch (Debian 12: vde2; Debian 13: vde2)" in msg


def test_check_only_reports_and_installs_nothing(monkeypatch):
    monkeypatch.setattr(host, "missing", lambda: [host.Need("qemu-img", "qemu-utils")])
    monkeypatch.setattr(host, "os_release", lambda: {"ID": "debian", "VERSION_ID": "12"})
    monkeypatch.setattr(host, "_apt", lambda *a: pytest.fail("--check must not install"))
    with pytest.raises(ApplianceError, match="the host is missing"):
        host.setup(log=lambda m: None, install=False)


def test_ready_host_is_left_alone(monkeypatch):
    monkeypatch.setattr(host, "missing", lambda: [])
    monkeypatch.setattr(host, "_apt", lambda *a: pytest.fail("nothing to install"))
    said = []
    host.setup(log=said.append)
    assert said == ["host ready: every build and boot dependency is installed"]


def test_a_version_outside_the_range_counts_as_missing(tmp_path, monkeypatch):
    for name, text in (("qemu-system-x86_64", "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7)"),
                       ("mkosi", "mkosi 25.3"), ("qemu-img", "qemu-img version 10.0.2 (Debian 1:10.0.2+ds-2)")):
        (tmp_path / name).write_text(f"#!/bin/sh\necho '{text}'\n")
        (tmp_path / name).chmod(0o755)
    monkeypatch.setattr(host, "HOST_PATH", str(tmp_path))
    qemu = host.Need("qemu-system-x86_64", "qemu-system-x86", backports=True, minimum=(10, 0))
    mkosi = host.Need("mkosi", "mkosi", backports=True, minimum=(24, 0), below=(25, 0))
    img = host.Need("qemu-img", "qemu-utils", backports=True, minimum=(10, 0))
    assert not qemu.present() and not mkosi.present() and img.present()
    monkeypatch.setattr(host, "NEEDS", [qemu, mkosi, img])
    monkeypatch.setattr(host, "os_release", lambda: {"ID": "debian", "VERSION_ID": "12"})
    with pytest.raises(ApplianceError) as exc:
        host.setup(log=lambda m: None, install=False)
    assert "qemu-system-x86_64 10.0 or newer (Debian package qemu-system-x86, from bookworm-backports)" in str(exc.value)
    assert "mkosi 24.x (Debian package mkosi, from bookworm-backports)" in str(exc.value)
    assert "qemu-img" not in str(exc.value)


def _record_setup(monkeypatch, tmp_path, release):
    ran = []
    state = {"installed": False}
    need = [n for n in host.NEEDS if n.what in ("mkosi", "/usr/lib/systemd/ukify", "bootctl", "vde_switch")]
    monkeypatch.setattr(host, "missing", lambda: [] if state["installed"] else need)
    monkeypatch.setattr(host, "os_release", lambda: {"ID": "debian", "VERSION_ID": release})
    monkeypatch.setattr(host, "BACKPORTS_SOURCES", tmp_path / "backports.sources")
    monkeypatch.setattr(host, "_has_backports", lambda: False)
    monkeypatch.setattr(host.os, "geteuid", lambda: 0)

    def apt(cmd, env, log):
        ran.append(cmd)
        state["installed"] = cmd[:2] == ["apt-get", "install"]
    monkeypatch.setattr(host, "_apt", apt)
    host.setup(log=lambda m: None)
    return ran


def test_debian_13_installs_its_own_packages_without_backports(monkeypatch, tmp_path):
    ran = _record_setup(monkeypatch, tmp_path, "13")
    assert not (tmp_path / "backports.sources").exists()
    installs = [c for c in ran if c[:2] == ["apt-get", "install"]]
    assert len(installs) == 1 and "-t" not in installs[0]
    assert {"mkosi", "systemd-ukify", "systemd-boot-tools", "vde2"} <= set(installs[0])


def test_debian_12_takes_the_boot_tools_from_bookworm_backports(monkeypatch, tmp_path):
    ran = _record_setup(monkeypatch, tmp_path, "12")
    assert "bookworm-backports" in (tmp_path / "backports.sources").read_text()
    bp = next(c for c in ran if "-t" in c)
    assert bp[bp.index("-t") + 1] == "bookworm-backports"
    assert {"mkosi", "systemd", "systemd-boot"} <= set(bp) and "systemd-ukify" not in bp
    assert any("vde2" in c and "-t" not in c for c in ran)


def test_mkosi_24_and_25_are_supported_and_26_is_not(tmp_path, monkeypatch):
    mkosi = next(n for n in host.NEEDS if n.what == "mkosi")
    monkeypatch.setattr(host, "HOST_PATH", str(tmp_path))
    for version, ok in (("mkosi 24.3", True), ("mkosi 25.3", True), ("mkosi 26.0", False), ("mkosi 23", False)):
        (tmp_path / "mkosi").write_text(f"#!/bin/sh\necho '{version}'\n")
        (tmp_path / "mkosi").chmod(0o755)
        assert mkosi.present() is ok, version
    assert mkosi.wanted_version == " 24.x or 25.x"
