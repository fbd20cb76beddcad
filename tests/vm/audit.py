"""Security measurements on live nodes, shared by tests/vm/test_hardening.py and
bench/hardening.py: which ports answer whom, systemd-analyze exposure (the running unit,
and Debian's unit alone for comparison), Lynis's hardening index, and testssl.sh through
a relay that speaks HAProxy's PROXY v2 like a frontend."""
from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import shlex
import socket
import struct
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Iterator

from appliance.qemu import USER_NET_HOST
from appliance.vm import Machine

# The mail daemons of each role, as systemd runs them.
DAEMONS = {
    "frontend": ["haproxy.service", "prometheus-node-exporter.service"],
    "filter": ["postfix.service", "rspamd.service", "redis-server.service", "prometheus-node-exporter.service"],
    "mailstore": ["postfix.service", "dovecot.service", "prometheus-node-exporter.service"],
}
# The product's own long-running or per-event units, reported (not held to a threshold).
OWN_UNITS = {
    "frontend": ["mailcluster-announce.service", "mailcluster-members.service"],
    "filter": ["mailcluster-announce.service", "mailcluster-members.service", "mailcluster-requeue.service",
               "mailcluster-spoolcrypt.service"],
    "mailstore": ["mailcluster-announce.service", "mailcluster-members.service", "mailcluster-backup.service",
                  "mailcluster-mailcrypt.service", "mailcluster-restore.service"],
}


# ---- ports -----------------------------------------------------------------------------
def listening(m: Machine) -> set[int]:
    """TCP ports `m` listens on beyond loopback: the only ones a firewall could let through."""
    out = m.succeed("ss -Htln")
    ports = set()
    for line in out.splitlines():
        local = line.split()[3]
        addr, port = local.rsplit(":", 1)
        if not addr.strip("[]").startswith(("127.", "::1")):
            ports.add(int(port))
    return ports


def reachable(peer: Machine, address: str, ports: set[int]) -> set[int]:
    """The ports of `address` that accept a TCP connection from `peer`, probed in parallel
    (a dropped SYN costs the 5 s timeout)."""
    probes = " ".join(
        f"(timeout 5 bash -c 'exec 3<>/dev/tcp/{address}/{p}' 2>/dev/null && echo open {p}) &" for p in sorted(ports))
    out = peer.succeed(f"{probes} wait", timeout=60)
    return {int(line.split()[1]) for line in out.splitlines() if line.startswith("open ")}


# ---- systemd-analyze security -----------------------------------------------------------
def exposure(m: Machine, unit: str) -> float:
    """systemd's exposure score of the unit as it runs (0 = locked down, 10 = exposed)."""
    out = m.succeed(f"systemd-analyze security --no-pager {shlex.quote(unit)} | tail -1")
    return _score(out, unit)


def vendor_exposure(m: Machine, unit: str) -> float:
    """The score of Debian's unit file alone, without this project's drop-ins."""
    vendor = f"/usr/lib/systemd/system/{unit}"
    out = m.succeed(
        f"d=$(mktemp -d) && install -D -m 0644 {vendor} \"$d/usr/lib/systemd/system/{unit}\" && "
        f"systemd-analyze security --no-pager --offline=yes --root=\"$d\" {unit} | tail -1; rm -rf \"$d\"")
    return _score(out, unit)


def _score(out: str, unit: str) -> float:
    found = re.search(r"exposure level for \S+: ([0-9.]+)", out)
    if not found:
        raise AssertionError(f"no exposure score for {unit} in: {out!r}")
    return float(found.group(1))


# ---- Lynis ------------------------------------------------------------------------------
def lynis_bundle() -> bytes:
    """This host's Lynis (Debian's package: shell scripts only) as one tarball laid out
    the way Lynis finds its parts when run from its own directory."""
    with tempfile.TemporaryDirectory(prefix="lynis-") as tmp:
        d = Path(tmp) / "lynis"
        d.mkdir()
        for src, dst in (("/usr/sbin/lynis", "lynis"), ("/usr/share/lynis/include", "include"),
                         ("/usr/share/lynis/db", "db"), ("/etc/lynis/plugins", "plugins"),
                         ("/etc/lynis/default.prf", "default.prf")):
            subprocess.run(["cp", "-a", src, str(d / dst)], check=True)
        return subprocess.run(["tar", "-C", tmp, "--owner=root", "--group=root", "-czf", "-", "lynis"],
                              check=True, capture_output=True).stdout


def lynis(m: Machine) -> dict:
    """A full Lynis audit of the running node: the hardening index and what Lynis
    suggests and warns about (test id and text). Lynis runs from /run, copied in for
    the audit: the images never carry it."""
    with tempfile.NamedTemporaryFile(suffix=".tgz") as tgz:
        tgz.write(lynis_bundle())
        tgz.flush()
        m.copy_from_host(Path(tgz.name), "/run/lynis.tgz")
    m.succeed("rm -rf /run/lynis /var/log/lynis-report.dat && tar -C /run -xzf /run/lynis.tgz && cd /run/lynis && "
              "(sh ./lynis audit system --quick --no-colors >/run/lynis.out 2>&1 || true); "
              "test -s /var/log/lynis-report.dat", timeout=1800)
    report = m.succeed("cat /var/log/lynis-report.dat")
    values: dict[str, list[str]] = {}
    for line in report.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            values.setdefault(key, []).append(value)
    index = values.get("hardening_index")
    if not index:
        raise AssertionError(f"{m.name}: Lynis wrote no hardening index:\n{report[-2000:]}")

    def items(key: str) -> list[str]:
        return [" ".join(v.split("|")[:2]) for v in values.get(key, [])]

    return {"hardening_index": int(index[0]), "tests_performed": int(values.get("lynis_tests_done", ["0"])[0]),
            "suggestions": items("suggestion[]"), "warnings": items("warning[]")}


# ---- TLS -------------------------------------------------------------------------------
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_v2_header(client: str, client_port: int, server: str, server_port: int) -> bytes:
    addrs = ipaddress.ip_address(client).packed + ipaddress.ip_address(server).packed
    return PROXY_V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", 12) + addrs + struct.pack(
        "!HH", client_port, server_port)


@contextlib.contextmanager
def proxy_relay(upstream_port: int, client: str = "192.0.2.25") -> Iterator[int]:
    """A local port that forwards to 127.0.0.1:`upstream_port` after a PROXY v2 header
    naming `client`: what HAProxy does for a filter. Yields the local port."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def serve() -> None:
        server.settimeout(0.5)
        while not stop.is_set():
            try:
                conn, (_, port) = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                up = socket.create_connection(("127.0.0.1", upstream_port), timeout=30)
            except OSError:
                conn.close()
                continue
            up.settimeout(None)
            up.sendall(proxy_v2_header(client, port, "10.0.2.15", 25))
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=pump, args=(a, b), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        server.close()
        thread.join(timeout=5)


# Protocols that must never be offered, and testssl.sh's ids of its vulnerability checks.
OLD_PROTOCOLS = ("SSLv2", "SSLv3", "TLS1", "TLS1_1")
VULNERABILITY_IDS = ("heartbleed", "CCS", "ticketbleed", "ROBOT", "secure_renego", "secure_client_renego",
                     "CRIME_TLS", "POODLE_SSL", "fallback_SCSV", "SWEET32", "FREAK", "DROWN", "LOGJAM",
                     "BEAST", "LUCKY13", "winshock", "RC4", "opossum")
BAD_SEVERITIES = ("LOW", "MEDIUM", "HIGH", "CRITICAL")


def tls_scan(port: int, starttls: str | None = None, timeout: float = 1500) -> list[dict]:
    """testssl.sh (protocols, cipher categories, forward secrecy, vulnerabilities) against
    127.0.0.1:`port`; its JSON findings. No DNS lookups, nothing fetched from elsewhere."""
    with tempfile.TemporaryDirectory(prefix="testssl-") as tmp:
        out = Path(tmp) / "findings.json"
        cmd = ["testssl", "--quiet", "--color", "0", "--warnings", "off", "--nodns", "none",
               "--jsonfile", str(out), "-p", "-s", "-f", "-U"]
        if starttls:
            cmd += ["--starttls", starttls]
        r = subprocess.run([*cmd, f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=timeout)
        if not out.exists():
            raise AssertionError(f"testssl.sh wrote no findings (exit {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-2000:]}")
        findings = json.loads(out.read_text())
    return findings


def filter_smtp_tls_scan(flt: Machine) -> list[dict]:
    """testssl.sh on a filter's STARTTLS on port 25. This host plays a frontend: for the
    scan the filter's firewall admits it, and a relay sends HAProxy's PROXY header first."""
    flt.succeed(f"nft add element inet filter frontends {{ {USER_NET_HOST} }}")
    try:
        with proxy_relay(flt.forward(25)) as port:
            return tls_scan(port, starttls="smtp")
    finally:
        flt.succeed(f"nft delete element inet filter frontends {{ {USER_NET_HOST} }}")


def tls_problems(findings: list[dict]) -> list[str]:
    """Old protocols offered and vulnerabilities found, one line each; empty when clean."""
    problems = []
    for f in findings:
        fid, finding, severity = f.get("id", ""), f.get("finding", ""), f.get("severity", "")
        if fid in OLD_PROTOCOLS and "not offered" not in finding:
            problems.append(f"{fid}: {finding}")
        elif fid.startswith(VULNERABILITY_IDS) and severity in BAD_SEVERITIES:
            problems.append(f"{fid} ({severity}): {finding}")
        elif fid == "scanProblem" or severity == "FATAL":
            problems.append(f"testssl.sh could not scan: {finding}")
    return problems


def tls_summary(findings: list[dict]) -> dict[str, str]:
    """What a report shows: each protocol's verdict and each vulnerability's."""
    keep = (*OLD_PROTOCOLS, "TLS1_2", "TLS1_3", "FS", *VULNERABILITY_IDS)
    return {f["id"]: f["finding"] for f in findings if f.get("id", "").startswith(keep)}
