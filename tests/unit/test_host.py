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
    assert "mkosi (Debian package mkosi, from bookworm-backports)" in msg
    assert "vde_switch (Debian package vde2)" in msg


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
