"""`members` on the host against scratch directories: how announcements fold into the
membership (join, takeover, forget), and what each role's daemons are given from it.
The daemons' own commands (nft, postfix, postconf, haproxy, systemctl) are this test's,
recording what they were asked; the files are what the daemons would read."""
import os
import subprocess
from pathlib import Path

import pytest

from appliance import paths
from tests.tools import samples, script_lib

MEMBERS = paths.OVERLAYS / "10-base/usr/libexec/mailcluster/members"

CLUSTER = """\
node fe1 frontend 10.77.0.10 active
node filter1 filter 10.77.0.21 active
node filter2 filter 10.77.0.22 active
node store1 mailstore 10.77.0.31 active
node store2 mailstore 10.77.0.32 standby
user alice@example.test store1
user bob@example.test store1
alias postmaster@example.test alice@example.test
alias team@example.test alice@example.test,bob@example.test,friend@example.net
backup store1 store2
"""


class Node:
    """One node's view: its state directory, /etc, and the commands it ran."""

    def __init__(self, tmp_path: Path, role: str, members: str = CLUSTER):
        self.root = tmp_path / role
        self.lib = script_lib(self.root / "lib", role)
        self.state, self.etc, self.bin = self.root / "state", self.root / "etc", self.root / "bin"
        for d in (self.state / "inbox", self.etc / "postfix", self.etc / "haproxy", self.bin):
            d.mkdir(parents=True)
        (self.state / "members").write_text(members)
        self.calls = self.root / "calls"
        self.calls.touch()
        relay = "[10.77.0.21]:10025"  # what postconf -h relayhost answers: filter1 only
        for name, body in {
            "nft": f'echo "nft $*" >>{self.calls}; cp "$2" {self.root}/nft-input',
            "systemctl": f'echo "systemctl $*" >>{self.calls}',  # is-active: yes
            "postfix": f'echo "postfix $*" >>{self.calls}',
            "postconf": f'echo "postconf $*" >>{self.calls}; [ "$1" = -h ] && echo "{relay}"; true',
            "haproxy": f'echo "haproxy $*" >>{self.calls}',
        }.items():
            (self.bin / name).write_text(f"#!/bin/sh\n{body}\n")
            (self.bin / name).chmod(0o755)

    def run(self, *args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "MC_LIB": str(self.lib), "MC_STATE": str(self.state), "MC_ETC": str(self.etc),
               "PATH": f"{self.bin}:{os.environ['PATH']}"}
        r = subprocess.run(["bash", str(MEMBERS), *args], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return r

    def announce(self, *requests: str) -> subprocess.CompletedProcess:
        """Announcements as join-request queues them ("FROM VERB ARGS"), then folded in."""
        for i, req in enumerate(requests):
            (self.state / "inbox" / f"{i:03d}.req").write_text(req + "\n")
        return self.run("inbox")

    def records(self, kind: str) -> list[str]:
        return sorted(l for l in (self.state / "members").read_text().splitlines() if l.startswith(kind + " "))

    def etc_file(self, rel: str) -> str:
        return (self.etc / rel).read_text()

    def called(self) -> list[str]:
        return self.calls.read_text().splitlines()


def test_a_takeover_hands_the_primarys_users_to_its_backup(tmp_path):
    node = Node(tmp_path, "filter")
    r = node.announce("10.77.0.32 takeover store2 store1")
    assert "member store2 took over store1's mail (announced from 10.77.0.32)" in r.stdout
    assert node.records("user") == ["user alice@example.test store2", "user bob@example.test store2"]
    assert node.records("node") == ["node fe1 frontend 10.77.0.10 active", "node filter1 filter 10.77.0.21 active",
                                    "node filter2 filter 10.77.0.22 active", "node store1 mailstore 10.77.0.31 standby",
                                    "node store2 mailstore 10.77.0.32 active"]
    # the filter now delivers to the backup, and takes outgoing mail from it alone
    assert node.etc_file("postfix/transport") == ("alice@example.test relay:[10.77.0.32]:25\n"
                                                  "bob@example.test relay:[10.77.0.32]:25\n")
    assert node.etc_file("postfix/mailstores.cidr") == "10.77.0.32/32 OK\n"


def test_a_rebuilt_primary_rejoining_takes_back_no_user_its_backup_serves(tmp_path):
    node = Node(tmp_path, "filter")
    node.announce("10.77.0.32 takeover store2 store1")
    # store1 comes back with a fresh disk and claims its users, and a new one
    node.announce("10.77.0.31 join store1 mailstore 10.77.0.31 active alice@example.test,bob@example.test,"
                  "carol@example.test")
    assert node.records("user") == ["user alice@example.test store2", "user bob@example.test store2",
                                    "user carol@example.test store1"]
    # once store2 is no longer active (the restore hands them back), the claim holds
    node.announce("10.77.0.32 join store2 mailstore 10.77.0.32 standby",
                  "10.77.0.31 join store1 mailstore 10.77.0.31 active alice@example.test,bob@example.test")
    assert node.records("user") == ["user alice@example.test store1", "user bob@example.test store1",
                                    "user carol@example.test store1"]


def test_a_forgotten_node_leaves_the_membership_and_the_daemons(tmp_path):
    node = Node(tmp_path, "mailstore")
    node.announce("10.77.0.10 forget filter2")
    assert "node filter2 filter 10.77.0.22 active" not in node.records("node")
    assert node.etc_file("postfix/filters.cidr") == "10.77.0.21/32 OK\n"
    # the relay host is now filter1 alone, as Postfix already has it: not set again
    assert [c for c in node.called() if c.startswith("postconf -e")] == []


def test_prometheus_is_told_the_membership_this_node_sees(tmp_path):
    node = Node(tmp_path, "filter")
    node.announce("10.77.0.10 forget filter2")
    got = samples(node.state / "metrics" / "members.prom")
    members = {k: v for k, v in got.items() if k.startswith("mailcluster_members{")}
    assert {k: v for k, v in members.items() if v} == {
        'mailcluster_members{member_role="frontend",state="active"}': 1,
        'mailcluster_members{member_role="filter",state="active"}': 1,
        'mailcluster_members{member_role="mailstore",state="active"}': 1,
        'mailcluster_members{member_role="mailstore",state="standby"}': 1}
    assert len(members) == 6  # every role and state, zeros too: a missing series hides nothing
    assert {k: v for k, v in got.items() if k.startswith("mailcluster_member_records")} == {
        'mailcluster_member_records{kind="user"}': 2, 'mailcluster_member_records{kind="alias"}': 2,
        'mailcluster_member_records{kind="catchall"}': 0}


def test_the_filter_is_given_recipients_routes_and_who_may_send_out(tmp_path):
    node = Node(tmp_path, "filter")
    r = node.run("apply")
    assert "membership applied: 5 nodes, 2 users, 2 aliases, 0 catch-alls" in r.stdout
    assert node.etc_file("postfix/relay_recipients") == ("alice@example.test OK\nbob@example.test OK\n"
                                                         "postmaster@example.test OK\nteam@example.test OK\n")
    assert node.etc_file("postfix/virtual") == (
        "postmaster@example.test alice@example.test\n"
        "team@example.test alice@example.test, bob@example.test, friend@example.net\n")
    assert node.etc_file("postfix/transport") == ("alice@example.test relay:[10.77.0.31]:25\n"
                                                  "bob@example.test relay:[10.77.0.31]:25\n")
    assert node.etc_file("postfix/postscreen_access.cidr") == "10.77.0.10/32 permit\n"
    assert node.etc_file("postfix/mailstores.cidr") == "10.77.0.31/32 OK\n"  # not the standby backup
    assert "postfix reload" in node.called()
    # Nothing changed: nothing is reloaded.
    node.calls.write_text("")
    node.run("apply")
    assert "postfix reload" not in node.called()


def test_a_catch_all_takes_its_domains_other_addresses_but_not_its_users_mail(tmp_path):
    node = Node(tmp_path, "filter", CLUSTER + "user dave@example.com store1\n"
                                             "catchall example.com carol@example.test,friend@example.net\n")
    r = node.run("apply")
    assert "1 catch-alls" in r.stdout
    recipients = node.etc_file("postfix/relay_recipients").splitlines()
    assert "@example.com OK" in recipients and "dave@example.com OK" in recipients
    virtual = node.etc_file("postfix/virtual").splitlines()
    assert "@example.com carol@example.test, friend@example.net" in virtual
    # dave keeps his own mail; example.test has no catch-all, so its users need no entry
    assert "dave@example.com dave@example.com" in virtual
    assert not any(line.startswith(("alice@", "bob@")) for line in virtual), virtual


def test_the_mailstore_sends_out_through_every_filter_on_their_outbound_port(tmp_path):
    node = Node(tmp_path, "mailstore")
    node.run("apply")
    assert node.etc_file("postfix/filters.cidr") == "10.77.0.21/32 OK\n10.77.0.22/32 OK\n"
    # what its own users send to an alias reaches the targets too
    assert node.etc_file("postfix/virtual").splitlines()[0] == "postmaster@example.test alice@example.test"
    assert "postconf -e relayhost = [10.77.0.21]:10025, [10.77.0.22]:10025" in node.called()
    assert "postfix reload" in node.called()


def test_the_frontend_balances_over_the_filters_and_active_mailstores(tmp_path):
    node = Node(tmp_path, "frontend")
    (node.lib / "haproxy.cfg.in").write_text(
        "backend filters_25\n#@servers filter 25\n\nbackend mailstores_587\n#@servers mailstore 10587 active\n")
    node.run("apply")
    assert node.etc_file("haproxy/haproxy.cfg") == (
        "backend filters_25\n\tserver filter1 10.77.0.21:25\n\tserver filter2 10.77.0.22:25\n\n"
        "backend mailstores_587\n\tserver store1 10.77.0.31:10587\n")
    # checked by HAProxy before it is reloaded with it
    assert [c for c in node.called() if not c.startswith("nft")] == [
        "systemctl -q is-active haproxy.service", f"haproxy -c -q -f {node.etc}/haproxy/haproxy.cfg",
        "systemctl reload haproxy.service"]


@pytest.mark.parametrize("role", ["frontend", "filter", "mailstore"])
def test_every_role_admits_each_roles_active_members_in_its_firewall(tmp_path, role):
    node = Node(tmp_path, role)
    node.run("apply")
    nft = (node.root / "nft-input").read_text()
    assert nft == ("flush set inet filter filters\nadd element inet filter filters { 10.77.0.21,10.77.0.22 }\n"
                   "flush set inet filter frontends\nadd element inet filter frontends { 10.77.0.10 }\n"
                   "flush set inet filter mailstores\nadd element inet filter mailstores { 10.77.0.31 }\n")
    assert f"nft -f {node.state}/members.nft" in node.called()


@pytest.mark.parametrize("record,problem", [
    ("alias team@example.test alice@example.test,bob@example.test", ""),
    ("alias team@example.test", "an alias record has 3 fields (alias ADDRESS TARGET[,TARGET...]), not 2"),
    ("alias team@example.test alice@example.test,|/bin/sh", "bad alias target '|/bin/sh'"),
    ("alias team@example.test alice@example.test,", ""),  # (read -a drops an empty last field)
    ("alias /etc/passwd alice@example.test", "bad mail address '/etc/passwd'"),
    ("catchall example.com carol@example.test", ""),
    ("catchall @example.com carol@example.test", "bad domain '@example.com'"),
    ("catchall example.com", "a catchall record has 3 fields (catchall DOMAIN TARGET[,TARGET...]), not 2"),
    ("catchall example.com carol@example.test,/etc/passwd", "bad catch-all target '/etc/passwd'"),
    ("alias team@-example.test alice@example.test", "bad mail address 'team@-example.test'"),
])
def test_an_alias_record_is_checked_before_it_reaches_postfix(tmp_path, record, problem):
    lib = script_lib(tmp_path / "lib", "filter")
    # (split into fields as check_members splits a line of the file)
    r = subprocess.run(["bash", "-c", '. "$MC_LIB/members.sh"; check_record $RECORD'], capture_output=True, text=True,
                       env={**os.environ, "MC_LIB": str(lib), "MC_STATE": str(tmp_path), "RECORD": record})
    assert r.stdout.strip() == problem
