"""The join handler (the command sshd forces for a node key the site's node CA signed,
told which node the certificate names) and the principals command that binds the two,
run on the host against a scratch state directory: a node may only speak for itself, and
nothing malformed reaches the queue that root applies."""
import os
import subprocess

import pytest

from appliance import paths
from tests.tools import script_lib

BASE = paths.OVERLAYS / "10-base"
HANDLER = BASE / "usr/libexec/mailcluster/join-request"
PRINCIPALS = BASE / "usr/libexec/mailcluster/principals"
ADDRESSES = {"10.77.0.10": "fe1 frontend", "10.77.0.21": "filter1 filter", "10.77.0.23": "filter3 filter",
             "10.77.0.31": "store1 mailstore", "10.77.0.32": "store2 mailstore", "10.77.0.33": "store3 mailstore",
             "10.77.0.34": "store4 mailstore"}

MEMBERS = """\
node fe1 frontend 10.77.0.10 active
node filter1 filter 10.77.0.21 active
node store1 mailstore 10.77.0.31 active
node store2 mailstore 10.77.0.32 standby
node store3 mailstore 10.77.0.33 active
user alice@example.test store1
backup store1 store2
"""


@pytest.fixture
def state(tmp_path):
    for d in ("inbox", "inbox.tmp"):
        (tmp_path / d).mkdir()
    (tmp_path / "members").write_text(MEMBERS)
    (tmp_path / "identity").write_text("fe1 frontend 10.77.0.10\n")
    return tmp_path


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    """/usr/lib/mailcluster as the frontend's image has it."""
    return script_lib(tmp_path_factory.mktemp("lib"), "frontend")


@pytest.fixture(autouse=True)
def env(lib, monkeypatch):
    monkeypatch.setitem(ENV, "MC_LIB", str(lib))


ENV = dict(os.environ)


def request(state, text: str, source: str, certified: str | None = None):
    """`text` from `source`, by the node a certificate names `certified` ("NAME ROLE"; by
    default the node whose address `source` is: sshd enforces the certificate's
    source-address)."""
    env = {**ENV, "MC_STATE": str(state), "SSH_CONNECTION": f"{source} 40000 10.77.0.10 22",
           "SSH_ORIGINAL_COMMAND": text}
    who = (certified if certified is not None else ADDRESSES.get(source, "")).split()
    r = subprocess.run(["bash", str(HANDLER), *who], env=env, capture_output=True, text=True)
    queued = [p.read_text() for p in sorted((state / "inbox").iterdir())]
    return r, queued


def test_a_node_joins_for_itself(state):
    r, queued = request(state, "join filter3 filter 10.77.0.23 active", "10.77.0.23")
    assert r.returncode == 0 and r.stdout.startswith("ok: queued on fe1"), r
    assert queued == ["10.77.0.23 join filter3 filter 10.77.0.23 active\n"]
    r, queued = request(state, "join store4 mailstore 10.77.0.34 active dave@example.test,erin@example.test", "10.77.0.34")
    assert r.returncode == 0 and len(queued) == 2
    # a member announcing itself again, as it does at every boot
    r, queued = request(state, "join store1 mailstore 10.77.0.31 active alice@example.test", "10.77.0.31")
    assert r.returncode == 0 and len(queued) == 3


@pytest.mark.parametrize("text,source,why", [
    ("join filter3 filter 10.77.0.23 active", "10.77.0.99", "claims address 10.77.0.23 but connects from 10.77.0.99"),
    ("join filter3 webmail 10.77.0.23 active", "10.77.0.23", "bad role 'webmail'"),
    ("join Filter_3 filter 10.77.0.23 active", "10.77.0.23", "bad node name"),
    ("join filter3 filter 10.77.0.300 active", "10.77.0.300", "bad IPv4 address"),
    ("join filter3 filter 10.77.0.23 active alice@example.test", "10.77.0.23", "only mailstores serve users"),
    ("join store3 mailstore 10.77.0.33 active a@b;reboot", "10.77.0.33", "bad mail address"),
    ("takeover store2 store1", "10.77.0.66", "store2 is not a member at 10.77.0.66"),
    ("takeover filter1 store1", "10.77.0.21", "filter1 is not a mailstore"),
    ("forget fe1", "10.77.0.21", "cannot be told to forget itself"),
    ("forget store1", "10.77.0.23", "filter3 is not a member at 10.77.0.23"),
    # A node speaking for others (each reproduced against the handler of the shared
    # join key): the frontend announcing itself as store1 with store1's users,
    ("join store1 mailstore 10.77.0.10 active alice@example.test", "10.77.0.10", "fe1 cannot speak for store1"),
    # as another role,
    ("join fe1 mailstore 10.77.0.10 active alice@example.test", "10.77.0.10", "fe1 is certified as a frontend, not a mailstore"),
    # taking over the users of a pair it is not part of in another node's name,
    ("takeover store2 store1", "10.77.0.21", "filter1 cannot speak for store2"),
    # a certificate that was made for a member's name at another address, or for a new
    # name at a member's address (sshd checks the certificate's address; these are what
    # a mistaken or stale certificate could still claim),
    ("join store1 mailstore 10.77.0.66 active", "10.77.0.66", "store1 is a member at 10.77.0.31"),
    ("join evil mailstore 10.77.0.21 active alice@example.test", "10.77.0.21", "10.77.0.21 is member filter1's address"),
    # a member changing its role,
    ("join filter1 mailstore 10.77.0.21 active alice@example.test", "10.77.0.21", "filter1 is a member with role filter"),
    # a filter telling everyone to forget the mailstore that holds the mailboxes,
    ("forget store1", "10.77.0.21", "store1 still serves 1 mail users"),
    # a mailstore that is not the pair's backup taking over the primary's users.
    ("takeover store3 store1", "10.77.0.33", "store3 and store1 are not a backup pair"),
    ("sh -c id", "10.77.0.21", "unknown request 'sh'"),
])
def test_refused_requests_name_the_problem_and_queue_nothing(state, text, source, why):
    # (whom the certificate names where the source is not that node's address: what the
    # handler checks itself, beyond sshd's check of the certificate's source-address)
    certified = {("join filter3 filter 10.77.0.23 active", "10.77.0.99"): "filter3 filter",
                 ("join filter3 filter 10.77.0.300 active", "10.77.0.300"): "filter3 filter",
                 ("takeover store2 store1", "10.77.0.66"): "store2 mailstore",
                 ("join store1 mailstore 10.77.0.66 active", "10.77.0.66"): "store1 mailstore",
                 ("join evil mailstore 10.77.0.21 active alice@example.test", "10.77.0.21"): "evil mailstore",
                 ("join filter1 mailstore 10.77.0.21 active alice@example.test", "10.77.0.21"): "filter1 mailstore",
                 ("forget store1", "192.0.2.1"): "fe1 frontend"}.get((text, source))
    r, queued = request(state, text, source, certified)
    assert r.returncode == 1 and why in r.stdout, r
    assert queued == []


def test_a_takeover_comes_from_the_backup_itself(state):
    r, queued = request(state, "takeover store2 store1", "10.77.0.32")
    assert r.returncode == 0, r
    assert queued == ["10.77.0.32 takeover store2 store1\n"]
    # and a restored primary takes its users back from its backup
    r, queued = request(state, "takeover store1 store2", "10.77.0.31")
    assert r.returncode == 0, r


def test_a_node_that_serves_nobody_can_be_forgotten(state):
    r, queued = request(state, "forget filter1", "10.77.0.33")
    assert r.returncode == 0 and queued == ["10.77.0.33 forget filter1\n"], r


@pytest.mark.parametrize("who", ["", "filter1", "filter1 webmail", "Filter1 filter", "../x filter"])
def test_no_certified_identity_no_request(state, who):
    """The handler runs only as told by the principals command; started any other way it
    queues nothing."""
    r, queued = request(state, "join filter1 filter 10.77.0.21 active", "10.77.0.21", certified=who)
    assert r.returncode == 1 and "no certified node identity" in r.stdout, r
    assert queued == []


def principals(key_id: str):
    return subprocess.run(["bash", str(PRINCIPALS), key_id], env=ENV, capture_output=True, text=True)


def test_a_certificate_admits_its_own_node_only():
    r = principals("filter3:filter")
    assert r.returncode == 0, r
    # one principal, the node's name; the handler forced, told who speaks; nothing else
    assert r.stdout == 'restrict,command="/usr/libexec/mailcluster/join-request filter3 filter" filter3\n'


@pytest.mark.parametrize("key_id", ["filter3", "filter3:webmail", "filter3:filter:x", "Filter3:filter",
                                    'x" y:filter', "filter3:filter,command=sh", ":filter", ""])
def test_a_key_id_that_is_not_a_node_admits_nobody(key_id):
    r = principals(key_id)
    assert r.returncode != 0 and r.stdout == "", r
