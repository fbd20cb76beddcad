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
