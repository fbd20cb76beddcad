"""The one QEMU launcher: `./build.py run` and the VM tests both boot through it.

Guests run under TCG (no usable KVM here). The host reaches a guest only through
forwards bound to 127.0.0.1 on QEMU user networking with `restrict=on`, so a guest can
never open a connection out of the host. Guests reach each other on a private vde
switch the caller creates. Each VM boots a qcow2 overlay over the read-only image, so the
image in the store is never written to.
"""
from __future__ import annotations

import base64
import contextlib
import json
import shutil
import os
import signal
import socket
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ApplianceError
from .wait import Timeout, retry

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
AGENT_PORT_NAME = "org.mailcluster.agent"
USER_NET = "10.0.2.0/24"  # QEMU's slirp default: the management/forwarding NIC
# Where connections forwarded from the host appear to come from, inside the guest.
USER_NET_HOST = "10.0.2.2"
# No working KVM on these machines (HOST-NOTES.md): software emulation, with QEMU's own
# default translation cache (1 GiB on x86-64 hosts).
ACCEL = ("-accel", "tcg")
# Under emulation the guest's CPU model is ours to choose, and it is the one thing that
# differs from bare metal: qemu64 is the x86-64 baseline Debian builds for. It has no
# SSSE3, which Hyperscan refuses, so rspamd matches with its ACISM engine instead of
# compiling Hyperscan databases in the main process at every first start (113 s of a
# filter's 158-s boot under TCG with `-cpu max`). No SVM either: with it every guest
# loaded kvm_amd for nothing. Images are the same; a real CPU gets Hyperscan.
CPU = "qemu64,-svm"
# vCPUs per guest: one guest booting alone (`./build.py run`) uses both host cores.
SMP = 2
# Guests of a cluster (the tests, `run --cluster`, bench/) get one: several share two
# host cores, where a second vCPU bought nothing measurable (a 4-guest boot took as
# long), and once a guest's idle second vCPU never woke again ("rcu_preempt kthread
# timer wakeup didn't happen ... on cpu=1", the agent silent for 600 s) while the host
# was loaded. One vCPU has no secondary CPU to lose.
CLUSTER_SMP = 1


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mac_for(name: str, nic: int) -> str:
    """A stable, locally administered MAC per node and NIC."""
    import hashlib
    h = hashlib.sha256(f"{name}/{nic}".encode()).digest()
    return "52:54:" + ":".join(f"{b:02x}" for b in h[:4])


@dataclass
class VMSpec:
    name: str
    image: Path                      # the raw image; opened read-only as a backing file
    state_dir: Path                  # overlay disk, OVMF vars, sockets, logs
    memory_mb: int = 1024
    smp: int = SMP
    disk_size: str = "6G"            # virtual size of the overlay; first boot may grow into it
    forwards: dict[int, int] = field(default_factory=dict)  # guest port -> host port on 127.0.0.1
    credentials: dict[str, bytes] = field(default_factory=dict)
    cluster_switch: Path | None = None   # vde_switch socket directory
    cluster_mac: str | None = None
    agent: bool = False              # add the virtio-serial test control port
    interactive: bool = False        # serial console on this terminal instead of a log file
    block_device: Path | None = None     # boot a real block device instead of an overlay
    tpm: bool = False                # a TPM 2.0 (swtpm, its state kept beside the disk)

    @property
    def disk(self) -> Path:
        return self.state_dir / "disk.qcow2"

    @property
    def serial_log(self) -> Path:
        return self.state_dir / "serial.log"

    @property
    def qmp_socket(self) -> Path:
        return self.state_dir / "qmp.sock"

    @property
    def agent_socket(self) -> Path:
        return self.state_dir / "agent.sock"

    @property
    def ovmf_vars(self) -> Path:
        return self.state_dir / "OVMF_VARS.fd"

    @property
    def credentials_file(self) -> Path:
        return self.state_dir / "credentials.smbios"

    @property
    def tpm_state(self) -> Path:
        return self.state_dir / "tpm"

    @property
    def tpm_socket(self) -> Path:
        return self.state_dir / "tpm.sock"


def qemu_command(spec: VMSpec) -> list[str]:
    """Build the QEMU command line for `spec` (pure: tested without booting)."""
    fwd = "".join(f",hostfwd=tcp:127.0.0.1:{host}-:{guest}" for guest, host in sorted(spec.forwards.items()))
    disk = (f"file={spec.block_device},format=raw,if=none,id=root,cache=unsafe"
            if spec.block_device else f"file={spec.disk},format=qcow2,if=none,id=root,cache=unsafe,discard=unmap")
    cmd = [
        "qemu-system-x86_64",
        "-name", spec.name,
        "-machine", "q35",
        *ACCEL,
        "-cpu", CPU,
        "-smp", str(spec.smp),
        "-m", str(spec.memory_mb),
        "-nodefaults",
        "-display", "none",
        "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
        "-drive", f"if=pflash,format=raw,file={spec.ovmf_vars}",
        "-drive", disk,
        "-device", "virtio-blk-pci,drive=root,bootindex=1",
        "-device", "virtio-rng-pci",
        # NIC 0: management. restrict=on: the guest cannot reach anything but these forwards.
        "-netdev", f"user,id=mgmt,restrict=on,net={USER_NET}{fwd}",
        "-device", f"virtio-net-pci,netdev=mgmt,mac={mac_for(spec.name, 0)}",
        "-qmp", f"unix:{spec.qmp_socket},server=on,wait=off",
    ]
    if spec.cluster_switch is not None:
        cmd += [
            "-netdev", f"vde,id=cluster,sock={spec.cluster_switch}",
            "-device", f"virtio-net-pci,netdev=cluster,mac={spec.cluster_mac or mac_for(spec.name, 1)}",
        ]
    if spec.interactive:
        # signal=on keeps Ctrl-C a signal for the terminal's foreground group; QEMU runs in
        # its own session, so it is build.py that gets it and powers the guest off cleanly.
        cmd += ["-chardev", "stdio,id=console,mux=on,signal=on", "-serial", "chardev:console",
                "-mon", "chardev=console,mode=readline"]
    else:
        cmd += ["-chardev", f"file,id=serial0,path={spec.serial_log}", "-serial", "chardev:serial0"]
    if spec.agent:
        cmd += [
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,id=agent,path={spec.agent_socket},server=on,wait=off",
            "-device", f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
        ]
    if spec.tpm:
        cmd += ["-chardev", f"socket,id=tpm,path={spec.tpm_socket}",
                "-tpmdev", "emulator,id=tpm0,chardev=tpm", "-device", "tpm-crb,tpmdev=tpm0"]
    cmd += ["-smbios", f"file={spec.credentials_file}"]
    return cmd


def swtpm_command(spec: VMSpec) -> list[str]:
    """The software TPM for `spec`'s guest: its state persists across the guest's
    reboots (sealed credentials must open again), and it exits with QEMU (--terminate)."""
    return ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={spec.tpm_state},mode=0600",
            "--ctrl", f"type=unixio,path={spec.tpm_socket},mode=0600", "--terminate"]


# QEMU numbers the type 11 structure it makes itself from this handle; ours replaces it.
_OEM_STRINGS, _OEM_HANDLE = 11, 0x0B00


# Under emulation on a busy host the root disk can appear minutes into the boot (four
# guests booting beside image builds on two cores: virtio_blk probed after 157 s), and
# systemd's default 90 s device timeout then drops the initrd into emergency mode; a
# unit's start can take as long (Postfix's ExecStartPre on a filter, starved for 90 s
# while the host was busy, was killed and the filter never served). Guests started here
# wait 10 minutes for both, inside the harness's own boot bound (vm.BOOT_TIMEOUT), so a
# guest that never finds its disk is still reported by the harness. systemd-stub appends
# this SMBIOS string to the UKI's command line; images on hardware keep the defaults.
EMULATION_CMDLINE = ("systemd.default_device_timeout_sec=600", "systemd.default_timeout_start_sec=600")


def smbios_table(credentials: dict[str, bytes], cmdline_extra: tuple[str, ...] = ()) -> bytes:
    """systemd credentials as one SMBIOS type 11 (OEM strings) structure, which PID 1
    imports at boot. QEMU loads it from a file (`-smbios file=`): passed as
    `-smbios type=11,value=...` instead, every secret would be on QEMU's command line,
    which any local user can read in /proc."""
    strings = [f"io.systemd.credential.binary:{name}={base64.b64encode(value).decode()}".encode()
               for name, value in sorted(credentials.items())]
    if cmdline_extra:
        strings.append(f"io.systemd.stub.kernel-cmdline-extra={' '.join(cmdline_extra)}".encode())
    if not 0 < len(strings) < 256:
        raise ApplianceError(f"{len(strings)} credentials: an SMBIOS OEM-strings table holds 1 to 255")
    header = struct.pack("<BBHB", _OEM_STRINGS, 5, _OEM_HANDLE, len(strings))
    return header + b"".join(s + b"\0" for s in strings) + b"\0"


def write_credentials(spec: VMSpec) -> None:
    """The SMBIOS table QEMU reads at start, readable by this user only."""
    spec.state_dir.mkdir(parents=True, exist_ok=True)
    tmp = spec.credentials_file.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(smbios_table(spec.credentials, EMULATION_CMDLINE))
    tmp.replace(spec.credentials_file)


def check_host(tpm: bool = False) -> None:
    missing = [p for p in ("qemu-system-x86_64", "qemu-img", *(("swtpm",) if tpm else ())) if shutil.which(p) is None]
    missing += [str(p) for p in (OVMF_CODE, OVMF_VARS) if not p.exists()]
    if missing:
        raise ApplianceError(f"cannot boot images: missing {', '.join(missing)}", hint="run ./build.py setup")


def prepare(spec: VMSpec, fresh: bool = True) -> None:
    """Create the VM's state: a copy of the UEFI variables and an overlay over the image."""
    check_host(spec.tpm)
    spec.state_dir.mkdir(parents=True, exist_ok=True)
    if fresh or not spec.ovmf_vars.exists():
        shutil.copyfile(OVMF_VARS, spec.ovmf_vars)
    if spec.block_device is None and (fresh or not spec.disk.exists()):
        spec.disk.unlink(missing_ok=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(spec.image.resolve()),
                        str(spec.disk), spec.disk_size], check=True)
    if spec.tpm and fresh:
        shutil.rmtree(spec.tpm_state, ignore_errors=True)
    for sock in (spec.qmp_socket, spec.agent_socket, spec.tpm_socket):
        sock.unlink(missing_ok=True)


def spawn_tied(cmd: list[str], **popen) -> subprocess.Popen:
    """Start `cmd` in a session of its own (a terminal's Ctrl-C reaches the caller, which
    powers guests off in order) that gets SIGTERM if the caller dies first: a test run
    stopped by a time limit, or killed, leaves no guest running without an owner.
    (The caller must stay alive in the thread that started it: the kernel ties the
    signal to that thread.)"""
    return subprocess.Popen(["setpriv", "--pdeathsig", "TERM", "--", *cmd], start_new_session=True, **popen)


class QemuProcess:
    """A running QEMU; stopped by its own PID only.

    Reaped with wait4, not Popen's waitpid, for the CPU time the guest cost: under TCG a
    test suite's time is its guests' CPU. `on_exit(wall_seconds, cpu_seconds)` hears of
    every run."""

    def __init__(self, spec: VMSpec, on_exit=None):
        self.spec = spec
        self.proc: subprocess.Popen | None = None
        self.tpm: subprocess.Popen | None = None
        self.started_at = 0.0
        self.on_exit = on_exit

    def start(self) -> None:
        cmd = qemu_command(self.spec)
        write_credentials(self.spec)
        # For debugging (no secret is on it: credentials are in a file of their own).
        (self.spec.state_dir / "qemu.cmdline").write_text(" ".join(cmd) + "\n")
        stdio = None if self.spec.interactive else subprocess.DEVNULL
        err = None if self.spec.interactive else open(self.spec.state_dir / "qemu.stderr", "w")
        if self.spec.tpm:
            self._start_tpm()
        self.proc = spawn_tied(cmd, stdin=stdio, stdout=stdio, stderr=err)
        self.started_at = time.monotonic()

    def _start_tpm(self) -> None:
        """swtpm, listening before QEMU connects to it (a bounded wait for its socket)."""
        self.spec.tpm_socket.unlink(missing_ok=True)
        self.spec.tpm_state.mkdir(mode=0o700, exist_ok=True)
        log = open(self.spec.state_dir / "swtpm.stderr", "w")
        self.tpm = spawn_tied(swtpm_command(self.spec), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        tpm = self.tpm
        with contextlib.suppress(Timeout):
            retry(lambda last: tpm.poll() is not None or self.spec.tpm_socket.exists(), 10, interval=0.05)
        if tpm.poll() is not None or not self.spec.tpm_socket.exists():
            self._stop_tpm()
            raise ApplianceError(f"{self.spec.name}: swtpm did not start: "
                                 f"{(self.spec.state_dir / 'swtpm.stderr').read_text().strip() or 'no socket'}",
                                 hint="run ./build.py setup (it installs swtpm)")

    def _stop_tpm(self) -> None:
        """swtpm exits once QEMU closes its socket; one that does not is killed (by its PID)."""
        if self.tpm is not None:
            try:
                self.tpm.wait(5)
            except subprocess.TimeoutExpired:
                self.tpm.kill()
                self.tpm.wait(10)
            self.tpm = None

    @property
    def running(self) -> bool:
        return self.proc is not None and not self._reaped()

    def _reaped(self) -> bool:
        """True once QEMU has exited (reaping it, the first time, and reporting its cost)."""
        assert self.proc
        if self.proc.returncode is not None:
            return True
        try:
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
        except ChildProcessError:  # (reaped elsewhere: its cost is unknown)
            self.proc.returncode = -1
            self._stop_tpm()
            return True
        if not pid:
            return False
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self._stop_tpm()
        if self.on_exit:
            self.on_exit(time.monotonic() - self.started_at, usage.ru_utime + usage.ru_stime)
        return True

    def qmp(self, command: str, **arguments) -> dict:
        """One QMP command over a fresh connection (bounded by a socket timeout)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(self.spec.qmp_socket))
            f = s.makefile("rw")
            f.readline()  # greeting
            for cmd in ({"execute": "qmp_capabilities"}, {"execute": command, "arguments": arguments}):
                f.write(json.dumps(cmd) + "\n")
                f.flush()
                while True:
                    reply = json.loads(f.readline())
                    if "return" in reply or "error" in reply:
                        break
            if "error" in reply:
                raise ApplianceError(f"{self.spec.name}: QMP {command} failed: {reply['error']}")
            return reply["return"]

    def wait_exit(self, timeout: float | None) -> bool:
        """True once QEMU has exited; False if it still runs after `timeout` seconds
        (None: for as long as it runs, as `./build.py run` does)."""
        if self.proc is None:
            return True
        if timeout is None:
            # Blocks until it exits but leaves it unreaped (WNOWAIT): _reaped reaps it and
            # reports its cost.
            with contextlib.suppress(ChildProcessError):
                os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOWAIT)
            return self._reaped()
        try:
            retry(lambda last: self._reaped(), timeout, interval=0.2)
            return True
        except TimeoutError:
            return False

    def press_power_button(self) -> None:
        """ACPI power button; the guest shuts down in its own time (see finish)."""
        if self.running:
            try:
                self.qmp("system_powerdown")
            except (OSError, ApplianceError, ValueError):
                pass   # (a QEMU that cannot take it is killed by finish)

    def finish(self, timeout: float) -> None:
        """A bounded wait for QEMU to exit; kill it if the guest still runs after that."""
        if not self.wait_exit(timeout):
            self.kill()

    def powerdown(self, timeout: float = 90) -> None:
        """ACPI power button, then a bounded wait; kill if the guest ignores it."""
        self.press_power_button()
        self.finish(timeout)

    def kill(self) -> None:
        if self.running:
            assert self.proc
            # (os.kill, not Popen.send_signal: that polls first, which would reap the
            # process itself and lose its cost; unreaped, the PID cannot be reused)
            os.kill(self.proc.pid, signal.SIGKILL)
            self.wait_exit(30)


def wait_for_banner(port: int, prefix: bytes, timeout: float, host: str = "127.0.0.1") -> bytes:
    """A forwarded port accepts before the guest listens: wait for the protocol's greeting."""
    def greeting(last: bool) -> bytes | OSError:
        try:
            with socket.create_connection((host, port), timeout=5) as s:
                s.settimeout(10)
                return s.recv(512)
        except OSError as e:
            return e

    try:
        banner = retry(greeting, timeout, until=lambda r: isinstance(r, bytes) and r.startswith(prefix))
    except Timeout as e:
        raise TimeoutError(f"no {prefix!r} greeting on {host}:{port} within {timeout:.0f} s "
                           f"(last: {e.last!r})") from None
    assert isinstance(banner, bytes)   # what `until` accepted
    return banner
