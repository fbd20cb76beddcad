"""The test "Internet": a network namespace plugged into a cluster's switch, standing for
every other mail system. Nothing in it reaches further than that switch.

It runs what the filters meet when they deliver users' mail out:
- a validating resolver (unbound) that the site's network.resolvers point at, answering
  from zones the test makes here: example.net (plain), dane.example (DNSSEC-signed, with
  a TLSA record that the receiver's certificate does not match; its trust anchor is
  given to this resolver, whose DNSSEC verdict the filters trust);
- a mail server (tests/receiver.py) for every MX of those zones, with STARTTLS, which
  keeps what it accepts, and HTTPS for sts.example's MTA-STS policy ("enforce", for an MX
  name the mail server's certificate does not cover). Its certificates come from a CA
  of this run (`ca`), which a test that wants them trusted installs on the filters;
- an ACME CA (pebble) at ACME_DIRECTORY, validating HTTP-01 challenges on port 80 of the
  names the site's zones (`site_zones`: what ./build.py dns prints) point at, and DNS-01
  challenges in those zones;
- the site's DNS server (Knot, on DNS_UPDATE_PORT), which serves the site's zones to the
  resolver and takes RFC 2136 updates of TXT records signed with the TSIG key it
  writes for the site (`tsig_key_file`).
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import ipaddress
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from appliance.paths import HOST_PATH, ROOT
from appliance.wait import Timeout, retry
from tests.tools import site_certificate

# Zone -> its records (relative names, as in a zone file); "@" is the zone itself, and
# {address} the namespace's own address (every MX host, the policy host, the ACME CA).
PLAIN = "example.net"
DANE = "dane.example"
STS = "sts.example"
ZONES = {
    PLAIN: ["@ MX 10 mx", "mx A {address}", "acme A {address}"],
    DANE: ["@ MX 10 mx", "mx A {address}",
           # DANE-EE, SPKI, SHA-256 of a key that is not the receiver's: a filter must refuse it.
           "_25._tcp.mx TLSA 3 1 1 " + hashlib.sha256(b"not the receiver's key").hexdigest()],
    STS: ["@ MX 10 mx", "mx A {address}", "mta-sts A {address}", '_mta-sts TXT "v=STSv1; id=1"'],
}
STS_POLICY = f"version: STSv1\nmode: enforce\nmx: mx.{STS}\nmax_age: 86400\n"
SIGNED = (DANE,)
ACME_DIRECTORY = f"https://acme.{PLAIN}:14000/dir"
# Where the site's zones are served from, and updated (DNS-01).
DNS_UPDATE_PORT = 5353
TSIG_NAME = "acme-update"
IP = shutil.which("ip", path=HOST_PATH) or "ip"
# The namespace's host number on the cluster's network.
HOST = 200


def site_zones(site, secrets) -> dict[str, list[str]]:
    """The records ./build.py dns prints for `site` as zones to serve: one per mail
    domain, each record under the longest domain it belongs to."""
    from appliance.dns import record_groups

    records = [r for group in record_groups(site, None, secrets)[1] for r in group]
    domains = sorted({r.name.rstrip(".") for r in records if r.type == "MX"}, key=len, reverse=True)
    out: dict[str, list[str]] = {}
    for r in records:
        name = r.name.rstrip(".")
        zone = next((d for d in domains if name == d or name.endswith("." + d)), None)
        if zone is not None:
            out.setdefault(zone, []).append(dataclasses.replace(r, note="").line())
    return out


def knot_config(workdir: Path, listen: str, secret: str, zones: list[str]) -> Path:
    """workdir/knot.conf: Knot serving `zones` from workdir/ZONE.zone on `listen`
    (ADDRESS@PORT), taking updates of TXT records (the challenges) signed with the TSIG
    key TSIG_NAME, and nothing else; updates live in memory only."""
    knot = workdir / "knot"
    knot.mkdir(exist_ok=True)
    conf = workdir / "knot.conf"
    conf.write_text("\n".join([
        "server:", f"  listen: {listen}", f'  rundir: "{knot}"',
        "log:", "  - target: stdout", "    any: info",
        "database:", f'  storage: "{knot}"',
        "key:", f"  - id: {TSIG_NAME}", "    algorithm: hmac-sha256", f"    secret: {secret}",
        "acl:", f"  - id: {TSIG_NAME}", f"    key: {TSIG_NAME}", "    action: update", "    update-type: [TXT]",
        "template:", "  - id: default", f'    storage: "{workdir}"', '    file: "%s.zone"',
        "    zonefile-sync: -1", "    journal-content: none", f"    acl: {TSIG_NAME}",
        "zone:", *(f"  - domain: {zone}." for zone in zones)]) + "\n")
    return conf


def tsig_key_text(secret: str) -> str:
    """The TSIG key as tsig-keygen writes it (what a site file's tls.acme.dns_update.key holds)."""
    return f'key "{TSIG_NAME}" {{\n\talgorithm hmac-sha256;\n\tsecret "{secret}";\n}};\n'


def address_on(network: ipaddress.IPv4Network) -> ipaddress.IPv4Interface:
    """Where the test Internet sits on a site's cluster network."""
    return ipaddress.IPv4Interface(f"{network[HOST]}/{network.prefixlen}")


def run(*cmd: str, **kw) -> subprocess.CompletedProcess:
    cmd = (shutil.which(cmd[0], path=HOST_PATH) or cmd[0], *cmd[1:])  # (sbin is not on every PATH)
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip() or r.stdout.strip()}")
    return r


class Internet:
    _ids = itertools.count(1)

    def __init__(self, workdir: Path, switch: Path, address: ipaddress.IPv4Interface,
                 zones: dict[str, list[str]] | None = None):
        """`zones`: more zones to serve, name -> records (zone-file lines, absolute names)."""
        self.workdir, self.switch, self.address = workdir, switch, address
        self.site_zones = zones or {}
        self.netns = f"mc-net-{os.getpid()}-{next(self._ids)}"
        self.inbox = workdir / "inbox"
        self.procs: list[subprocess.Popen] = []
        self.plug_pid = workdir / "plug.pid"
        self.created = False
        self.tsig_secret = base64.b64encode(os.urandom(32)).decode()

    @property
    def ip(self) -> str:
        return str(self.address.ip)

    def start(self) -> "Internet":
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir.mkdir(parents=True)
        self.inbox.mkdir()
        run("ip", "netns", "add", self.netns)
        self.created = True
        for cmd in (["ip", "link", "set", "lo", "up"], ["ip", "tuntap", "add", "dev", "tap0", "mode", "tap"],
                    ["ip", "address", "add", str(self.address), "dev", "tap0"], ["ip", "link", "set", "tap0", "up"],
                    ["vde_plug2tap", "-d", "-s", str(self.switch), "-P", str(self.plug_pid), "tap0"]):
            self.exec(*cmd)
        self._start_dns()
        chain, key, self.ca = site_certificate(self.workdir / "tls", [f"mx.{PLAIN}", f"mta-sts.{STS}", f"acme.{PLAIN}"])
        (self.workdir / "pebble.json").write_text(json.dumps({"pebble": {
            "listenAddress": f"{self.ip}:14000", "managementListenAddress": f"{self.ip}:15000",
            "certificate": str(chain), "privateKey": str(key), "httpPort": 80, "tlsPort": 5001,
            "ocspResponderURL": "", "externalAccountBindingRequired": False}}))
        self.start_acme()
        www = self.workdir / "www"
        (www / ".well-known").mkdir(parents=True)
        (www / ".well-known/mta-sts.txt").write_text(STS_POLICY)
        self._spawn("receiver", sys.executable, "-m", "tests.receiver", str(self.inbox), self.ip, str(chain), str(key),
                    str(www), cwd=ROOT)
        try:
            retry(lambda last: self._alive() and (self.inbox / "ready").exists() and self._resolves(),
                  timeout=60, interval=0.2)
        except Timeout:
            raise RuntimeError("the test Internet did not come up:\n" + self.logs()) from None
        return self

    def start_acme(self) -> None:
        """The ACME CA. Validations at once, no nonce refused for testing clients'
        retries, and every order challenged (none rides on another node's valid
        authorization)."""
        self.acme = self._spawn("acme", "env", "PEBBLE_VA_NOSLEEP=1", "PEBBLE_WFE_NONCEREJECT=0",
                                "PEBBLE_AUTHZREUSE=0", "pebble", "-config", str(self.workdir / "pebble.json"),
                                "-dnsserver", f"{self.ip}:53")

    def stop_acme(self) -> None:
        """The ACME CA goes away (an outage): start_acme brings a new one, with new roots."""
        self.end(self.acme)

    def exec(self, *cmd: str, **kw) -> subprocess.CompletedProcess:
        return run("ip", "netns", "exec", self.netns, *cmd, **kw)

    def spawn(self, name: str, *cmd: str) -> subprocess.Popen:
        """Run `cmd` in the namespace (a peer on the cluster's network, at this address),
        its output in NAME.log; stopped with the Internet, or by `end`."""
        return self._spawn(name, *cmd)

    def end(self, proc: subprocess.Popen) -> None:
        if proc in self.procs:
            self.procs.remove(proc)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)

    def _spawn(self, name: str, *cmd: str, cwd: Path | None = None) -> subprocess.Popen:
        with open(self.workdir / f"{name}.log", "a") as log:
            cmd = (shutil.which(cmd[0], path=HOST_PATH) or cmd[0], *cmd[1:])
            self.procs.append(subprocess.Popen([IP, "netns", "exec", self.netns, *cmd], stdout=log,
                                               stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True))
        return self.procs[-1]

    def serve(self, zones: dict[str, list[str]]) -> None:
        """Serve these site zones from now on (the site changed, and what ./build.py dns
        prints with it): the resolver starts again with them."""
        self.site_zones = zones
        for proc in (self.resolver, self.dns):
            self.procs.remove(proc)
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        self._start_dns()
        try:
            retry(lambda last: self._alive() and self._resolves(), timeout=60, interval=0.2)
        except Timeout:
            raise RuntimeError("the test Internet's resolver did not come back:\n" + self.logs()) from None

    def _start_dns(self) -> None:
        """The zones written, then the site's DNS server and the resolver in front of it."""
        self._zones()
        self.dns = self._spawn("dns", "knotd", "-c", str(self.workdir / "knot.conf"))
        self.resolver = self._spawn("resolver", "unbound", "-d", "-c", str(self.workdir / "unbound.conf"))

    def _alive(self) -> bool:
        dead = [p.args for p in self.procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"the test Internet's {dead} exited:\n" + self.logs())
        return True

    def lookup(self, name: str, rtype: str, port: int = 53) -> list[str]:
        """What the resolver (port 53) or the site's DNS server (DNS_UPDATE_PORT) answers
        for `name` and `rtype`: ./build.py dns --check's lookup, from inside the namespace.
        RuntimeError when nothing answers."""
        ask = "import json, sys; from appliance.dns import lookup; print(json.dumps(lookup(*sys.argv[1:])))"
        return json.loads(self.exec(sys.executable, "-c", ask, f"{self.ip}:{port}", name, rtype, cwd=ROOT).stdout)

    def _resolves(self) -> bool:
        try:
            return self.lookup(f"{PLAIN}.", "MX") == [f"10 mx.{PLAIN}."] and all(
                self.lookup(f"{zone}.", "SOA") for zone in self.site_zones)
        except RuntimeError:
            return False

    def tsig_key_file(self, path: Path) -> Path:
        """The TSIG key the site's DNS server takes updates with, written for the site
        file (tls.acme.dns_update.key) as tsig-keygen writes one, mode 0600."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(tsig_key_text(self.tsig_secret))
        return path

    def _zones(self) -> None:
        """Zone files (the signed ones signed here, with a new key each run) and the
        resolver's configuration: each zone served from its file and validated like data
        from any other server; every other name refused, never looked for outside."""
        server = [
            "server:", f"  interface: {self.ip}", "  port: 53", "  do-daemonize: no", '  chroot: ""', '  username: ""',
            f'  directory: "{self.workdir}"', '  pidfile: ""', "  use-syslog: no", '  logfile: ""', "  verbosity: 1",
            f"  access-control: {self.address.network} allow", '  module-config: "validator iterator"',
            "  val-log-level: 2", '  local-zone: "." refuse',
        ]
        zones: list[str] = []
        ours = {zone: [r.format(address=self.ip) for r in records] for zone, records in ZONES.items()}
        # The site's zones change (DNS-01): the resolver keeps them a second at most.
        server += ["  cache-max-ttl: 1", "  cache-max-negative-ttl: 1"]
        knot_config(self.workdir, f"{self.ip}@{DNS_UPDATE_PORT}", self.tsig_secret, list(self.site_zones))
        for zone, records in {**ours, **self.site_zones}.items():
            path = self.workdir / f"{zone}.zone"
            soa = f"@ SOA ns.{zone}. hostmaster.{zone}. 1 3600 600 86400 300"
            path.write_text(f"$ORIGIN {zone}.\n$TTL 300\n{soa}\n@ NS ns\nns A {self.ip}\n"
                            + "".join(r + "\n" for r in records))
            if zone in SIGNED:
                ksk = run("ldns-keygen", "-a", "ED25519", "-k", zone, cwd=self.workdir).stdout.strip()
                zsk = run("ldns-keygen", "-a", "ED25519", zone, cwd=self.workdir).stdout.strip()
                run("ldns-signzone", "-n", path.name, ksk, zsk, cwd=self.workdir)
                path = path.with_name(path.name + ".signed")
                server.append(f'  trust-anchor-file: "{self.workdir / (ksk + ".ds")}"')
            server.append(f'  local-zone: "{zone}." transparent')
            if zone in self.site_zones:
                zones += ["stub-zone:", f'  name: "{zone}."', f"  stub-addr: {self.ip}@{DNS_UPDATE_PORT}"]
            else:
                zones += ["auth-zone:", f'  name: "{zone}."', f'  zonefile: "{path}"', "  for-upstream: yes",
                          "  for-downstream: no", "  fallback-enabled: no"]
        (self.workdir / "unbound.conf").write_text("\n".join(server + zones) + "\n")

    def acme_roots(self) -> str:
        """The ACME CA's root and intermediate certificates (PEM): pebble makes new ones
        every start, and tells them on its management port."""
        fetch = (
            "import socket, ssl, sys\n"
            "ctx = ssl.create_default_context(cafile=sys.argv[1])\n"
            "for what in ('roots', 'intermediates'):\n"
            "    with socket.create_connection((sys.argv[2], 15000), timeout=10) as raw, "
            "ctx.wrap_socket(raw, server_hostname=sys.argv[3]) as s:\n"
            "        s.sendall(f'GET /{what}/0 HTTP/1.0\\r\\nHost: {sys.argv[3]}\\r\\n\\r\\n'.encode())\n"
            "        print(b''.join(iter(lambda: s.recv(65536), b'')).split(b'\\r\\n\\r\\n', 1)[1].decode().strip())\n")
        return self.exec(sys.executable, "-c", fetch, str(self.ca), self.ip, f"acme.{PLAIN}").stdout

    # ---- what arrived ------------------------------------------------------------------
    def received(self) -> list[tuple[dict, bytes]]:
        """Every message the receiver accepted: (envelope and TLS, message)."""
        out = []
        for meta in sorted(self.inbox.glob("*.json"), key=lambda p: int(p.stem)):
            out.append((json.loads(meta.read_text()), meta.with_suffix(".eml").read_bytes()))
        return out

    def wait_for(self, token: str, timeout: float = 180) -> tuple[dict, bytes]:
        try:
            return retry(lambda last: next(((m, b) for m, b in self.received() if token.encode() in b), None),
                         timeout=timeout, interval=1, until=lambda r: r is not None)
        except Timeout:
            raise AssertionError(f"no message with {token} reached the test Internet's receiver;\n" + self.logs()) from None

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n" + "\n".join(p.read_text(errors="replace").splitlines()[-30:])
                         for p in sorted(self.workdir.glob("*.log")))

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
        self.procs.clear()
        if self.plug_pid.exists():
            try:
                os.kill(int(self.plug_pid.read_text().strip()), signal.SIGTERM)
            except (ValueError, ProcessLookupError):
                pass
            self.plug_pid.unlink(missing_ok=True)
        if self.created:
            subprocess.run([IP, "netns", "delete", self.netns], capture_output=True)
            self.created = False

