"""Hardening, measured on every role image as it runs: the firewall as seen from the
cluster network and from outside the site, SSH refusing passwords, the mail daemons'
systemd sandboxes, and TLS as testssl.sh sees it. Lynis's hardening index is measured by
bench/hardening.py, not here: three audits under TCG cost over 15 minutes of the suite."""
from __future__ import annotations

import concurrent.futures
import socket
import ssl

import pytest

from appliance.qemu import USER_NET_HOST
from appliance.vm import subtest
from tests.vm.mail import new_tokens, send, wait_in_mailboxes
from tests.vm.audit import (DAEMONS, exposure, listening, reachable, tls_scan, filter_smtp_tls_scan,
                            tls_problems, tls_summary)

pytestmark = [pytest.mark.vm, pytest.mark.xdist_group("vm")]

NODES = {"frontend": "fe1", "filter": "filter1", "mailstore": "store1"}

# What answers whom, for the example site (whose admin network is its cluster network).
# From outside the site (this host, through QEMU's forwards): the public mail ports only.
PUBLIC = {"fe1": {25, 587}, "filter1": set(), "store1": {143, 587, 993}}
# Open to the world, but nothing listens unless the site uses ACME (this cluster does
# not yet): ACME's HTTP-01 challenges, and the MTA-STS policy (HTTPS). Refused by the
# node, not dropped by the firewall.
ONLY_WITH_ACME = {"fe1": {80, 443}, "filter1": set(), "store1": {80}}
# From a peer on the cluster network: SSH (peers join and back up over it), and the
# cluster ports of the peer's role: a filter takes SMTP from frontends only and outgoing
# mail (10025) from mailstores only; a mailstore takes SMTP from filters only and
# relayed submission (10587) from frontends only; a frontend's stats are for the admin
# network, which here is every peer, and so is every node's exporter (9100) and a
# mailstore's Dovecot metrics (9900).
FROM_PEER = {
    ("fe1", "filter1"): {22, 25, 587, 8404, 9100},
    ("filter1", "fe1"): {22, 25, 9100},
    ("filter1", "store1"): {22, 10025, 9100},
    ("filter1", "filter2"): {22, 9100},
    ("store1", "filter1"): {22, 25, 143, 587, 993, 9100, 9900},
    ("store1", "fe1"): {22, 143, 587, 993, 10587, 9100, 9900},
}
EXPOSURE_LIMIT = 5.0  # systemd-analyze's "MEDIUM" or better


@pytest.fixture(scope="module")
def cluster(mail_cluster):
    for name in NODES.values():
        mail_cluster[name].wait_for_boot()
    return mail_cluster


def address(cluster, name: str) -> str:
    return str(cluster.site.node(name).address)


# ---- firewall --------------------------------------------------------------------------
@pytest.mark.parametrize("target,peer", sorted(FROM_PEER))
def test_a_peer_reaches_only_what_its_role_may_use(cluster, target, peer):
    ports = listening(cluster[target])
    expected = FROM_PEER[(target, peer)]
    assert expected <= ports, f"{target} does not even listen on {sorted(expected - ports)}"
    assert reachable(cluster[peer], address(cluster, target), ports) == expected


def greets(port: int, tls: bool, timeout: float) -> bool:
    """Whether 127.0.0.1:port (a forward into a guest) speaks first within `timeout`:
    QEMU accepts the connection itself, so only an answer shows the guest let it in."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            if tls:
                ctx = ssl.create_default_context()
                ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
                s = ctx.wrap_socket(s)
            return len(s.recv(16)) > 0
    except (OSError, ssl.SSLError):
        return False


def test_from_outside_only_the_public_mail_ports_answer(cluster):
    probes = [(name, port) for name in PUBLIC for port in sorted(cluster[name].spec.forwards)]
    with concurrent.futures.ThreadPoolExecutor(len(probes)) as pool:
        answered = dict(zip(probes, pool.map(lambda np: greets(cluster[np[0]].forward(np[1]), np[1] == 993, 20),
                                             probes)))
    for name, public in PUBLIC.items():
        m = cluster[name]
        assert {p for (n, p), ok in answered.items() if n == name and ok} == public, name
        assert not ONLY_WITH_ACME[name] & listening(m), f"{name} answers ACME challenges without ACME"
        # The silent ones were refused by the firewall, which logs what it drops.
        dropped = m.succeed(f"journalctl -k -b --no-pager --grep 'nft input drop: .*SRC={USER_NET_HOST} ' || true")
        for port in set(m.spec.forwards) - public - ONLY_WITH_ACME[name]:
            assert f"DPT={port} " in dropped, f"{name}: no firewall drop logged for port {port}:\n{dropped[-1500:]}"


def test_ssh_refuses_passwords_even_correct_ones(cluster):
    target, peer = cluster["store1"], cluster["filter1"]
    target.succeed("useradd --create-home pwtest && usermod -p \"$(openssl passwd -6 'correct horse')\" pwtest")
    try:
        for user in ("pwtest", "root"):
            with subtest(f"{user} with a password"):
                rc, out = peer.execute(
                    "printf '#!/bin/sh\\necho \"correct horse\"\\n' > /run/askpass && chmod 0700 /run/askpass && "
                    "SSH_ASKPASS=/run/askpass SSH_ASKPASS_REQUIRE=force DISPLAY=:0 setsid -w "
                    "ssh -o PreferredAuthentications=password,keyboard-interactive -o PubkeyAuthentication=no "
                    "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o ConnectTimeout=20 "
                    f"{user}@{address(cluster, 'store1')} echo logged-in </dev/null", timeout=120)
                assert rc == 255 and "logged-in" not in out, out
                # The server offers public keys only: no password was ever asked for.
                assert "Permission denied (publickey)" in out, out
    finally:
        target.execute("userdel --remove pwtest")
    assert target.succeed("passwd --status root").split()[1] == "L"  # no console password either


# ---- the node itself ---------------------------------------------------------------------
@pytest.mark.parametrize("role", sorted(NODES))
def test_the_node_is_locked_down(cluster, role):
    m = cluster[NODES[role]]
    with subtest("no compilers or build tools"):
        found = m.succeed("for c in gcc cc c++ clang as ld make tcc; do command -v $c || true; done").split()
        assert found == [], found
    with subtest("scratch space cannot run programs"):
        for path in ("/tmp", "/var/tmp", "/dev/shm"):
            options = m.succeed(f"findmnt -no OPTIONS {path}").strip().split(",")
            assert {"nosuid", "nodev", "noexec"} <= set(options), (path, options)
        m.succeed("printf '#!/bin/sh\\necho ran\\n' > /tmp/x && chmod +x /tmp/x")
        assert "Permission denied" in m.fail("/tmp/x")
    with subtest("kernel settings"):
        for key, value in {"kernel.kptr_restrict": "2", "net.ipv4.conf.all.accept_redirects": "0",
                           "net.ipv4.conf.all.rp_filter": "1", "fs.suid_dumpable": "0",
                           "kernel.unprivileged_bpf_disabled": "1"}.items():
            assert m.succeed(f"sysctl -n {key}").strip() == value, key
        m.fail("modprobe usb-storage")
    with subtest("audit trail"):
        m.wait_for_unit("auditd.service")
        rules = m.succeed("auditctl -l")
        for key in ("identity", "sshd-config", "mail-config", "firewall", "modules"):
            # auditctl lists file watches as "-k KEY" and syscall rules as "-F key=KEY".
            assert f"-k {key}" in rules or f"key={key}" in rules, key
        m.succeed("touch /etc/ssh/sshd_config")
        m.wait_until_succeeds("ausearch -k sshd-config -i | grep -q sshd_config", timeout=60)
    with subtest("journal survives a reboot, within bounds"):
        m.succeed("test -d /var/log/journal/$(cat /etc/machine-id)")


# Debian's AppArmor profiles, as shipped: Postfix's and HAProxy's enforce, Dovecot's
# complain. Each process in its own profile (the daemons that always run).
POSTFIX = {"master": "postfix-master (enforce)", "qmgr": "postfix-qmgr (enforce)",
           "pickup": "postfix-pickup (enforce)"}
CONFINED = {"fe1": {"haproxy": "haproxy (enforce)"}, "filter1": POSTFIX,
            "store1": {**POSTFIX, "dovecot": "dovecot (complain)", "anvil": "dovecot-anvil (complain)"}}


def test_apparmor_confines_the_daemons_and_mail_flows_without_a_denial(cluster):
    rcpt, token = new_tokens(1)[0]
    assert send(cluster, [(rcpt, token)]) == [token]
    wait_in_mailboxes(cluster, [token])  # over IMAP: Dovecot's login and imap processes run
    for name, expected in CONFINED.items():
        m = cluster[name]
        assert m.succeed("aa-enabled").strip() == "Yes"
        # (comm, label) pairs, not a dict: Postfix and Dovecot each run an "anvil".
        running = {(comm, label) for label, comm in
                   (line.rsplit(None, 1) for line in m.succeed("ps -eo label=,comm=").splitlines())}
        missing = {(comm, label) for comm, label in expected.items()} - running
        assert not missing, f"{name}: not running so confined: {sorted(missing)}; running: {sorted(running)}"
    for name in CONFINED:
        # The profiles compiled at build time match this kernel: boots load them, never
        # compile them (20 s per boot under emulation).
        cache = cluster[name].succeed("apparmor_parser --skip-kernel-load --show-cache --replace /etc/apparmor.d 2>&1")
        assert "Cache miss" not in cache and "Cache hit" in cache, f"{name}: {cache[-2000:]}"
    for name in ("fe1", "filter1", "filter2", "store1"):
        denied = cluster[name].succeed("grep 'apparmor=\"DENIED\"' /var/log/audit/audit.log || true")
        assert denied == "", f"{name}: AppArmor denied what a daemon needed:\n{denied[-3000:]}"


@pytest.mark.parametrize("role", sorted(NODES))
def test_mail_daemons_run_sandboxed(cluster, role):
    m = cluster[NODES[role]]
    scores = {}
    for unit in DAEMONS[role]:
        m.wait_for_unit(unit, timeout=600)
        scores[unit] = exposure(m, unit)
    assert all(s <= EXPOSURE_LIMIT for s in scores.values()), scores


# ---- audits ------------------------------------------------------------------------------
def test_tls_on_the_filters_port_25_and_the_mailstores_993(cluster):
    smtp = filter_smtp_tls_scan(cluster["filter1"])
    imaps = tls_scan(cluster["store1"].forward(993))
    for what, findings in (("filter1:25 STARTTLS", smtp), ("store1:993", imaps)):
        print(f"{what}: {tls_summary(findings)}")
        offered = {f["id"]: f["finding"] for f in findings if f["id"] in ("TLS1_2", "TLS1_3")}
        assert offered.get("TLS1_2", "").startswith("offered"), (what, offered)
        assert tls_problems(findings) == [], what
