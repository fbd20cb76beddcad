"""A small VM driver in the spirit of the NixOS test driver.

`Machine` wraps one QEMU guest: lifecycle (start, shutdown, crash), a control channel
over virtio-serial (test images only), and bounded waits that fail with the serial
console tail and the failing unit's journal attached. `Cluster` boots a site's nodes on
a private vde switch, exposing machines by node name.
"""
from __future__ import annotations

import base64
import contextlib
import itertools
import json
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Mapping

from . import qemu
from .credentials import Secrets, node_credentials
from .plan import Plan
from .site import Node, Site
from .wait import Timeout, retry


# How long a guest may take to boot before the harness gives up and reports it. Under
# emulation a boot costs 1-3 minutes of CPU, and four or five guests share two cores,
# sometimes beside image builds: a bound for a hang, not a performance target
# (bench/boot_time.py measures those).
BOOT_TIMEOUT = 900
# A poll in a guest (the agent's bash, then systemctl or the command) costs a fair part
# of a CPU-second under emulation, taken from the guest being waited on: long waits poll
# every second at first, then at most every GUEST_POLL_MAX seconds.
GUEST_POLL_MAX = 3.0


class MachineError(Exception):
    """The driver or the guest broke (as opposed to a test assertion failing)."""


# Where each guest's run is accounted, one JSON line per QEMU run (name, wall and CPU
# seconds), when set: the test session sums them up.
CPU_LOG: Path | None = None


def log(msg: str) -> None:
    print(f"[vm] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def subtest(name: str) -> Iterator[None]:
    """Group steps; a failure inside names the step it was at."""
    log(f"subtest: {name}")
    try:
        yield
    except BaseException as e:
        e.add_note(f"(in subtest: {name})")
        raise


class Machine:
    _ids = itertools.count(1)

    def __init__(self, spec: qemu.VMSpec, disk_from: "Machine | None" = None):
        """`disk_from`: a machine of the same node, powered off, whose disk this one boots."""
        self.spec = spec
        self.name = spec.name
        self.process = qemu.QemuProcess(spec, on_exit=self._exited)
        self._agent: socket.socket | None = None
        self._agent_buf = b""
        self._booted_once: bool = disk_from is not None and disk_from._booted_once

    def _exited(self, wall: float, cpu: float) -> None:
        log(f"{self.name}: QEMU exited after {wall:.0f} s, having used {cpu:.0f} CPU-s")
        if CPU_LOG:
            with open(CPU_LOG, "a") as fh:
                fh.write(json.dumps({"name": self.name, "wall": round(wall, 1), "cpu": round(cpu, 1)}) + "\n")

    # ---- lifecycle -------------------------------------------------------------------
    def start(self, boot_timeout: float = BOOT_TIMEOUT, wait: bool = True, fresh: bool = False) -> None:
        """Boot (or re-boot the same disk after shutdown/crash) and wait for the agent.

        wait=False returns once QEMU runs, so several guests can boot at once; then
        call wait_started(). fresh=True boots a new disk made from the image: the node
        rebuilt, with the same credentials."""
        if self.process.running:
            return
        qemu.prepare(self.spec, fresh=fresh or not self._booted_once)
        self._booted_once = True
        log(f"{self.name}: starting ({self.spec.image.name})")
        self.process.start()
        if wait:
            self.wait_started(boot_timeout)

    def wait_started(self, timeout: float = BOOT_TIMEOUT) -> None:
        if self.spec.agent and self._agent is None:
            self._connect_agent(timeout)

    def shutdown(self, timeout: float = 120) -> None:
        """Clean power-off through ACPI; the disk keeps its state for a later start()."""
        self.press_power_button()
        self.process.finish(timeout)

    def press_power_button(self) -> None:
        """ACPI power-off, not waited for (Cluster.shutdown waits for all guests at once)."""
        log(f"{self.name}: shutting down")
        self._close_agent()
        self.process.press_power_button()

    def crash(self) -> None:
        """Hard power-off: no flush, no clean unmount."""
        log(f"{self.name}: crashing (hard power-off)")
        self._close_agent()
        self.process.kill()

    def block(self) -> None:
        """Pull the cluster cable; the control channel stays up."""
        log(f"{self.name}: cluster link down")
        self.process.qmp("set_link", name="cluster", up=False)

    def unblock(self) -> None:
        log(f"{self.name}: cluster link up")
        self.process.qmp("set_link", name="cluster", up=True)

    def forward(self, guest_port: int) -> int:
        """The 127.0.0.1 port on the host that reaches `guest_port`."""
        try:
            return self.spec.forwards[guest_port]
        except KeyError:
            raise MachineError(f"{self.name}: port {guest_port} is not forwarded "
                               f"(forwarded: {sorted(self.spec.forwards)})") from None

    # ---- control channel -------------------------------------------------------------
    def _connect_agent(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout

        def socket_ready(last: bool) -> bool:
            self._check_alive()
            return self.spec.agent_socket.exists()

        try:
            retry(socket_ready, timeout=30, interval=0.1)
        except TimeoutError:
            raise MachineError(f"{self.name}: QEMU never created {self.spec.agent_socket}" + self.diagnostics()) from None
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(self.spec.agent_socket))
        self._agent, self._agent_buf = s, b""
        # Requests sent before the guest opens its port may be dropped: ping until one answers.
        while True:
            self._check_alive()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MachineError(f"{self.name}: the guest's test agent did not answer within {timeout:.0f} s"
                                   + self.diagnostics())
            try:
                self._request("true", timeout=min(5.0, remaining))
                log(f"{self.name}: agent up after {time.monotonic() - self.process.started_at:.0f} s")
                return
            except TimeoutError:
                continue

    def _close_agent(self) -> None:
        if self._agent is not None:
            self._agent.close()
            self._agent = None

    def _check_alive(self) -> None:
        if not self.process.running:
            raise MachineError(f"{self.name}: QEMU exited" + self.diagnostics())

    def _request(self, script: str, timeout: float) -> tuple[int, str]:
        if self._agent is None:
            raise MachineError(f"{self.name}: not running (call start())")
        rid = str(next(self._ids))
        self._agent.sendall(f"{rid} {base64.b64encode(script.encode()).decode()}\n".encode())
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._agent_buf:
                line, self._agent_buf = self._agent_buf.split(b"\n", 1)
                parts = line.decode().split(" ", 2)
                if parts[0] == rid:  # replies to abandoned requests are skipped
                    return int(parts[1]), base64.b64decode(parts[2] if len(parts) > 2 else "").decode(errors="replace")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.name}: no answer to {script[:80]!r} within {timeout:.0f} s")
            self._agent.settimeout(min(remaining, 5))
            try:
                chunk = self._agent.recv(65536)
            except socket.timeout:
                self._check_alive()
                continue
            if not chunk:
                raise MachineError(f"{self.name}: control channel closed" + self.diagnostics())
            self._agent_buf += chunk

    def execute(self, cmd: str, timeout: float = 300) -> tuple[int, str]:
        return self._request(cmd, timeout)

    def succeed(self, *cmds: str, timeout: float = 300) -> str:
        __tracebackhide__ = True
        out = ""
        for cmd in cmds:
            rc, o = self.execute(cmd, timeout)
            if rc != 0:
                raise AssertionError(f"{self.name}: command failed (exit {rc}): {cmd}\n{o}")
            out += o
        return out

    def fail(self, *cmds: str, timeout: float = 300) -> str:
        __tracebackhide__ = True
        out = ""
        for cmd in cmds:
            rc, o = self.execute(cmd, timeout)
            if rc == 0:
                raise AssertionError(f"{self.name}: command unexpectedly succeeded: {cmd}\n{o}")
            out += o
        return out

    def wait_until_succeeds(self, cmd: str, timeout: float = 120) -> str:
        __tracebackhide__ = True
        try:
            _, out = retry(lambda last: self.execute(cmd, timeout=max(10, timeout)), timeout,
                           max_interval=GUEST_POLL_MAX, until=lambda r: r[0] == 0)
        except Timeout as e:
            raise AssertionError(f"{self.name}: never succeeded within {timeout:.0f} s: {cmd}\n"
                                 f"last output:\n{e.last[1]}") from None
        return out

    def wait_for_unit(self, unit: str, timeout: float = 180) -> None:
        """Wait until `unit` is active; fail at once, with its journal, if it fails."""
        __tracebackhide__ = True
        def state(last: bool) -> str:
            # (systemctl itself can fail for a moment while PID 1 reloads, which a booting
            # node's units do: that is "not yet", not the unit failing)
            rc, out = self.execute(f"systemctl show -P ActiveState {shlex.quote(unit)}")
            out = out.strip() if rc == 0 else f"unknown (systemctl: {out.strip()[-200:]})"
            if out == "failed":
                raise AssertionError(f"{self.name}: unit {unit} failed\n" + self.journal(unit))
            return out

        try:
            retry(state, timeout, max_interval=GUEST_POLL_MAX, until=lambda s: s == "active")
        except Timeout as e:
            raise AssertionError(f"{self.name}: unit {unit} not active within {timeout:.0f} s "
                                 f"(state {e.last})\n" + self.journal(unit) + self.stuck()) from None

    def wait_for_open_port(self, port: int, timeout: float = 120) -> None:
        __tracebackhide__ = True
        self.wait_until_succeeds(f"ss -Htln 'sport = :{port}' | grep -q .", timeout)

    def wait_for_boot(self, timeout: float = BOOT_TIMEOUT) -> None:
        """multi-user.target reached (or a clear report of what failed on the way)."""
        __tracebackhide__ = True
        def state(last: bool) -> str:
            return self.execute("systemctl is-system-running --wait", timeout=timeout)[1].strip()

        try:
            reached = retry(state, timeout, interval=2, until=lambda s: s in ("running", "degraded"))
        except Timeout as e:
            raise AssertionError(f"{self.name}: not booted within {timeout:.0f} s "
                                 f"(is-system-running: {e.last})" + self.stuck()) from None
        if reached == "degraded":
            failed = self.succeed("systemctl --failed --no-legend --plain")
            raise AssertionError(f"{self.name}: booted degraded; failed units:\n{failed}\n"
                                 + "\n".join(self.journal(u.split()[0]) for u in failed.splitlines() if u.strip()))

    def copy_from_host(self, src: Path, dest: str) -> None:
        data = base64.b64encode(Path(src).read_bytes()).decode()
        self.succeed(f"mkdir -p {shlex.quote(str(Path(dest).parent))}; base64 -d > {shlex.quote(dest)} <<'EOF'\n{data}\nEOF")

    def copy_to_host(self, src: str, dest: Path) -> None:
        out = self.succeed(f"base64 -w0 {shlex.quote(src)}")
        Path(dest).write_bytes(base64.b64decode(out))

    # ---- diagnostics -----------------------------------------------------------------
    def journal(self, unit: str, lines: int = 60) -> str:
        try:
            rc, out = self.execute(f"journalctl -b --no-pager -n {lines} -u {shlex.quote(unit)}", timeout=30)
        except Exception as e:  # the channel itself may be what broke
            return f"(journal of {unit} unavailable: {e})"
        return f"--- journal of {unit} on {self.name} ---\n{out}"

    def stuck(self) -> str:
        """What systemd is still waiting for, and the newest lines of the whole boot: a
        unit that never started has no journal of its own."""
        try:
            _, jobs = self.execute("systemctl list-jobs --no-pager", timeout=30)
            _, tail = self.execute("journalctl -b --no-pager -n 40", timeout=30)
        except Exception as e:
            return f"\n(jobs unavailable: {e})"
        return f"\n--- pending jobs on {self.name} ---\n{jobs}\n--- newest journal lines ---\n{tail}"

    def serial_tail(self, lines: int = 40) -> str:
        try:
            text = self.spec.serial_log.read_text(errors="replace")
        except FileNotFoundError:
            return "(no serial log)"
        return "\n".join(text.splitlines()[-lines:])

    def diagnostics(self) -> str:
        return (f"\n--- serial console of {self.name} ({self.spec.serial_log}), last lines ---\n"
                f"{self.serial_tail()}")

    def close(self) -> None:
        self._close_agent()
        self.process.kill()


class Switch:
    """A private userspace Ethernet switch (vde2); nothing else is plugged into it."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        if shutil.which("vde_switch") is None:
            raise MachineError("vde_switch not found; run ./build.py setup")
        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        logpath = self.directory.with_name(self.directory.name + ".log")
        # stdin stays an open pipe: vde_switch treats end-of-file on its console as "quit".
        with open(logpath, "w") as log:
            self.proc = proc = subprocess.Popen(["vde_switch", "--sock", str(self.directory)],
                                                stdin=subprocess.PIPE, stdout=log, stderr=log, start_new_session=True)
        try:
            retry(lambda last: (self.directory / "ctl").exists() or proc.poll() is not None,
                  timeout=10, interval=0.1)
        except TimeoutError:
            pass
        if not (self.directory / "ctl").exists():
            self.stop()
            raise MachineError(f"vde_switch did not start: {logpath.read_text().strip() or 'no output'}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        shutil.rmtree(self.directory, ignore_errors=True)


class Cluster:
    """Nodes of a site on one private switch, by node name."""

    def __init__(self, site: Site, images: dict[str, Path], workdir: Path,
                 plans: Mapping[str, Plan], secrets: Secrets, agent: bool = True,
                 memory_mb: int = 1024):
        """`plans`: each role's plan (appliance/plan.py), whose ports the host reaches
        through forwards: every port the role serves, so that tests can also check
        that the restricted ones are closed to it."""
        self.site = site
        self.secrets = secrets
        self.images = images
        self.workdir = workdir
        self.plans = plans
        self.agent = agent
        self.memory_mb = memory_mb
        self.switch = Switch(workdir / "switch")
        self.machines: dict[str, Machine] = {}

    def __getitem__(self, name: str) -> Machine:
        return self.machines[name]

    def machine(self, node: Node, credentials: dict[str, bytes] | None = None, site: Site | None = None,
                disk_from: Machine | None = None, tpm: bool = False) -> Machine:
        """`site`: the site file as the operator changed it for this node (a node added
        to a running cluster); the running nodes keep what they booted with. `disk_from`:
        the node's machine before, powered off (its disk boots again). `tpm`: the node
        has a TPM 2.0 (swtpm)."""
        if self.switch.proc is None:
            self.switch.start()
        mac = self.mac(node)
        creds = self.credentials(node, site)
        creds.update(credentials or {})
        spec = qemu.VMSpec(
            name=node.name, image=self.images[node.role], state_dir=self.workdir / node.name,
            memory_mb=self.memory_mb, smp=qemu.CLUSTER_SMP, forwards={p: qemu.free_port() for p in self.plans[node.role].forwarded_ports},
            credentials=creds, cluster_switch=self.switch.directory, cluster_mac=mac, agent=self.agent, tpm=tpm,
        )
        m = Machine(spec, disk_from=disk_from)
        self.machines[node.name] = m
        return m

    def reboot_with_new_credentials(self, name: str) -> tuple[Machine, Machine]:
        """Power `name` off through ACPI and boot its disk again with the credentials the
        site and its secrets give now (what an operator does after changing them):
        returns (the old machine, the new one); the new one is started, not waited for."""
        old = self.machines[name]
        old.shutdown()
        new = self.machine(self.site.node(name), disk_from=old)
        new.start(wait=False)
        return old, new

    def boot(self, *names: str, timeout: float = BOOT_TIMEOUT,
             created: Callable[[list[Machine]], None] | None = None) -> list[Machine]:
        """Start the named nodes together (their boots overlap) and, with the test agent,
        wait until each answers. `created` sees the machines before anything can fail.

        Four guests under TCG on two cores take 3 to 4 minutes when nothing else runs; an
        image build alongside (the other test worker) has stretched one to over 5."""
        machines = [self.machine(self.site.node(n)) for n in names]
        if created:
            created(machines)
        for m in machines:
            m.start(wait=False)
        for m in machines:
            m.wait_started(timeout)
        return machines

    def mail_endpoints(self) -> list[tuple[str, str, Machine, int]]:
        """(what, node, machine, guest port) an operator uses: SMTP and submission through
        each frontend, IMAP on each mailstore that serves users (not a standby backup)."""
        standby = {p.backup for p in self.site.backups}
        out = []
        for name, m in self.machines.items():
            role = self.site.node(name).role
            wanted = {"frontend": [("SMTP", "smtp"), ("submission", "submission")],
                      "mailstore": [] if name in standby else [("IMAP", "imap"), ("IMAPS", "imaps")]}.get(role, [])
            ports = self.plans[role].port_numbers()
            out += [(what, name, m, ports[service]) for what, service in wanted
                    if service in ports and ports[service] in m.spec.forwards]
        return out

    def wait_accepting_mail(self, timeout: float = 900) -> None:
        """Until the cluster takes mail: a frontend's SMTP greeting comes from a filter
        behind it, and every serving mailstore greets IMAP clients."""
        greetings = {"SMTP": b"220", "IMAP": b"* OK"}
        deadline = time.monotonic() + timeout
        for what, name, m, port in self.mail_endpoints():
            if what in greetings:
                try:
                    qemu.wait_for_banner(m.forward(port), greetings[what], max(deadline - time.monotonic(), 1))
                except TimeoutError as e:
                    raise MachineError(f"{name}: {e}\n{m.serial_tail(30)}") from None

    def access(self) -> str:
        """How to reach the running cluster from this host."""
        lines = [f"  {what:10} {name:8} 127.0.0.1:{m.forward(port):<5}  (guest port {port})"
                 for what, name, m, port in self.mail_endpoints()]
        for name, m in self.machines.items():
            ssh = self.plans[self.site.node(name).role].port_numbers().get("ssh")
            if ssh in m.spec.forwards:
                lines.append(f"  {'SSH':10} {name:8} 127.0.0.1:{m.forward(ssh):<5}  "
                             f"(from the admin network {self.site.network.admin_network} only)")
        return "\n".join(lines)

    def shutdown(self, timeout: float = 120) -> None:
        """Every guest at once through ACPI, then a bounded wait; kill what ignores it."""
        running = [m for m in self.machines.values() if m.process.running]
        for m in running:
            m.press_power_button()
        deadline = time.monotonic() + timeout
        for m in running:
            m.process.finish(max(deadline - time.monotonic(), 1))
        self.switch.stop()

    def mac(self, node: Node) -> str:
        return node.mac or qemu.mac_for(node.name, 1)

    def credentials(self, node: Node, site: Site | None = None) -> dict[str, bytes]:
        """What `./build.py credentials` makes for `node`, with its NIC on this switch."""
        return node_credentials(site or self.site, node, self.mac(node), self.secrets)

    def close(self) -> None:
        for m in self.machines.values():
            m.close()
        self.switch.stop()
