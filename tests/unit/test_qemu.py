"""Every QEMU command line the launcher builds keeps guests off the outside world."""
import base64
import re
import stat
from pathlib import Path

from appliance import qemu
from appliance.credentials import Secrets, node_credentials
from appliance.site import load_site
from appliance import paths
from tests.unit.test_cli import oem_strings


def specs(tmp_path):
    base = dict(image=Path("/img.raw"), state_dir=tmp_path)
    yield qemu.VMSpec(name="a", **base)
    yield qemu.VMSpec(name="b", forwards={25: 2525, 22: 2222, 993: 9993}, agent=True, **base)
    yield qemu.VMSpec(name="c", cluster_switch=tmp_path / "sw", interactive=True, **base)
    yield qemu.VMSpec(name="d", block_device=Path("/dev/loop7"), credentials={"x": b"y"}, **base)


def test_user_networking_is_always_restricted_and_forwards_bind_loopback(tmp_path):
    for spec in specs(tmp_path):
        cmd = qemu.qemu_command(spec)
        netdevs = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-netdev"]
        users = [n for n in netdevs if n.startswith("user,")]
        assert len(users) == 1
        for n in users:
            assert ",restrict=on" in n
            for fwd in re.findall(r"hostfwd=([^,]+)", n):
                assert fwd.startswith("tcp:127.0.0.1:"), fwd
        # anything else is the private switch, never a tap/bridge/socket to the host network
        assert all(n.startswith(("user,", "vde,")) for n in netdevs)
        assert "-nic" not in cmd and "-net" not in cmd
        assert cmd[cmd.index("-accel") + 1].startswith("tcg")


def test_credentials_reach_qemu_in_a_private_file_never_on_its_command_line(tmp_path):
    """Any local user can read a process's command line in /proc: a mailstore's
    eCryptfs key there would be readable by all of them."""
    site = load_site(paths.EXAMPLE_SITE, ["filter", "frontend", "mailstore"])
    creds = node_credentials(site, site.node("store1"), "52:54:00:00:00:02", Secrets(tmp_path / "secrets"))
    spec = qemu.VMSpec(name="s", image=Path("/i"), state_dir=tmp_path / "vm", credentials=creds)
    cmd = qemu.qemu_command(spec)
    line = " ".join(cmd)
    for name, value in creds.items():
        for form in (value, base64.b64encode(value)):
            assert form.decode(errors="replace") not in line, name
    assert "type=11" not in line
    assert cmd[cmd.index("-smbios") + 1] == f"file={spec.credentials_file}"
    qemu.write_credentials(spec)
    assert stat.S_IMODE(spec.credentials_file.stat().st_mode) == 0o600
    assert oem_strings(spec.credentials_file.read_bytes()) == creds
    # and systemd-stub's extra kernel command line, for the slow boots of emulation
    assert b"\0io.systemd.stub.kernel-cmdline-extra=systemd.default_device_timeout_sec=600 " \
           b"systemd.default_timeout_start_sec=600\0" in \
        spec.credentials_file.read_bytes()
    assert b"Address=10.77.0.31/24" in creds["network.network.10-cluster"]
    assert b"MACAddress=52:54:00:00:00:02" in creds["network.network.10-cluster"]


def test_secrets_are_generated_once_private_and_hashed(tmp_path):
    site = load_site(paths.EXAMPLE_SITE, ["filter", "frontend", "mailstore"])
    s = Secrets(tmp_path / "secrets")
    creds = node_credentials(site, site.node("store1"), None, s)
    again = node_credentials(site, site.node("store1"), None, Secrets(tmp_path / "secrets"))
    assert creds == again  # stable across invocations
    assert (tmp_path / "secrets").stat().st_mode & 0o777 == 0o700
    pw_file = tmp_path / "secrets/users/alice@example.test.password"
    assert pw_file.stat().st_mode & 0o777 == 0o600
    users = creds["mailcluster.mail-users"].decode()
    assert pw_file.read_text() not in users  # hashes only
    assert "alice@example.test:{SHA512-CRYPT}$6$rounds=" in users
    assert "userdb_quota_storage_size=512M" in users  # carol's quota from the site
    assert len(creds["mailcluster.mailstore-key"]) == 64
    assert "mailcluster.mailstore-key" not in node_credentials(site, site.node("fe1"), None, s)


def test_each_role_boots_on_a_cpu_without_ssse3_or_svm(tmp_path):
    """Every node's guest gets the baseline CPU under TCG: Hyperscan refuses it (no
    SSSE3), so a filter's rspamd does not compile its databases at boot, and no guest
    loads kvm_amd (no SVM). The same for every role, with QEMU's own translation cache."""
    site = load_site(paths.EXAMPLE_SITE, ["filter", "frontend", "mailstore"])
    roles = set()
    for node in site.nodes:
        creds = node_credentials(site, node, None, Secrets(tmp_path / "secrets"))
        spec = qemu.VMSpec(name=node.name, image=Path(f"/{node.role}.raw"), state_dir=tmp_path / node.name,
                           credentials=creds, agent=True, cluster_switch=tmp_path / "sw")
        cmd = qemu.qemu_command(spec)
        model, *flags = cmd[cmd.index("-cpu") + 1].split(",")
        assert model == "qemu64" and "-svm" in flags, cmd
        assert not any(f.lstrip("+") in ("ssse3", "sse4.1", "sse4.2", "avx", "avx2") for f in flags)
        assert cmd[cmd.index("-accel") + 1] == "tcg"
        assert cmd[cmd.index("-smp") + 1] == "2"
        roles.add(node.role)
    assert roles == {"filter", "frontend", "mailstore"}


def test_every_guest_run_reports_the_cpu_time_it_cost(tmp_path):
    """The harness's accounting of guest CPU (the suite's real budget under TCG): a run that
    ends by itself and one that is killed are each reported once, with what they used."""
    import subprocess
    import sys
    import time

    runs = []
    p = qemu.QemuProcess(qemu.VMSpec(name="a", image=Path("/img.raw"), state_dir=tmp_path),
                         on_exit=lambda wall, cpu: runs.append((wall, cpu)))
    # (a stand-in for QEMU: a real process that burns half a second of CPU, then exits)
    p.proc = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                               "while time.process_time() - t < 0.5: pass"])
    p.started_at = time.monotonic()
    assert p.wait_exit(60) and not p.running
    assert len(runs) == 1 and runs[0][1] >= 0.45 and runs[0][0] >= runs[0][1] * 0.9, runs
    p.proc = subprocess.Popen(["sleep", "60"])
    p.started_at = time.monotonic()
    assert p.running
    p.kill()
    assert not p.running and p.proc.returncode == -9
    assert len(runs) == 2 and runs[1][1] < 0.2 and runs[1][0] < 30, runs


def test_an_interactive_run_waits_for_its_guest_without_a_deadline(tmp_path):
    """`./build.py run` waits with no timeout for as long as the guest runs (it crashed
    with a TypeError on None once the wait became a bounded poll)."""
    import subprocess
    import time

    runs = []
    p = qemu.QemuProcess(qemu.VMSpec(name="a", image=Path("/img.raw"), state_dir=tmp_path),
                         on_exit=lambda wall, cpu: runs.append((wall, cpu)))
    p.proc = subprocess.Popen(["sleep", "0.5"])
    p.started_at = time.monotonic()
    assert p.wait_exit(timeout=None) and not p.running and p.proc.returncode == 0
    assert len(runs) == 1 and runs[0][0] >= 0.45, runs


def test_a_guest_does_not_outlive_the_process_that_started_it():
    """A run killed outright (a CI time limit, kill -9) runs no teardown: what it started
    must stop by itself. The owner here is a real Python process using the launcher's
    spawn; the guest stand-in is `sleep`."""
    import os
    import subprocess
    import sys

    from appliance.wait import retry

    owner = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom appliance.qemu import spawn_tied\n"
         "print(spawn_tied(['sleep', '300']).pid, flush=True)\ntime.sleep(300)"],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    guest = int(owner.stdout.readline())

    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    # setpriv arms the signal and then becomes the guest: kill the owner only after that
    # (a kill in between is a window of microseconds that a loaded host widens).
    retry(lambda last: Path(f"/proc/{guest}/comm").read_text().strip() == "sleep", timeout=10, interval=0.05)
    assert alive(guest)
    owner.kill()
    owner.wait()
    try:
        retry(lambda last: not alive(guest), timeout=10, interval=0.1)
    except TimeoutError:
        os.kill(guest, 9)
        raise AssertionError("the guest stand-in kept running after its owner was killed") from None


def test_a_guest_with_a_tpm_gets_a_swtpm_of_its_own_on_a_private_socket(tmp_path):
    """The TPM is a real swtpm that QEMU reaches through a socket only its user can open
    (another local user could otherwise unseal what the guest sealed), and it is stopped
    with the guest."""
    import stat

    spec = qemu.VMSpec(name="a", image=Path("/img.raw"), state_dir=tmp_path, tpm=True)
    cmd = qemu.qemu_command(spec)
    assert cmd[cmd.index("-tpmdev") + 1] == "emulator,id=tpm0,chardev=tpm"
    assert f"socket,id=tpm,path={spec.tpm_socket}" in cmd and "tpm-crb,tpmdev=tpm0" in cmd
    plain = qemu.qemu_command(qemu.VMSpec(name="b", image=Path("/img.raw"), state_dir=tmp_path))
    assert "-tpmdev" not in plain and not [a for a in plain if "tpm.sock" in a]
    p = qemu.QemuProcess(spec)
    p._start_tpm()
    tpm = p.tpm
    try:
        assert tpm is not None and tpm.poll() is None
        assert stat.S_IMODE(spec.tpm_socket.stat().st_mode) == 0o600
        assert stat.S_IMODE(spec.tpm_state.stat().st_mode) == 0o700
    finally:
        p._stop_tpm()
    assert tpm.poll() is not None and p.tpm is None
