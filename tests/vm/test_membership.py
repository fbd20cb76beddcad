"""Node identity and joining: one image per role, made into a node by its credentials at
first boot; a node added to the site joins the running cluster without a rebuild and
without touching the other nodes."""
from __future__ import annotations

import pytest

from appliance.wait import Timeout, retry
from tests.conftest import _live
from tests.vm.mail import (backend_status, new_tokens, send_in_sessions, wait_backends, wait_in_mailboxes,
                           wait_mail_up)

pytestmark = [pytest.mark.vm, pytest.mark.xdist_group("vm")]

NEW = {"name": "filter3", "role": "filter", "address": "10.77.0.23"}


@pytest.fixture(scope="module")
def cluster(mail_cluster):
    c = mail_cluster
    wait_mail_up(c["store1"])
    for name in ("filter1", "filter2"):
        c[name].wait_for_unit("postfix.service", timeout=600)
    wait_backends(c, {"filter1": "UP", "filter2": "UP"})
    return c


@pytest.fixture(scope="module")
def grown_site(site):
    """The site file after the operator added filter3 to it."""
    from appliance.site import Node
    return site.model_copy(update={"nodes": [*site.nodes, Node(**NEW)]})


def boot_ids(c, names) -> dict[str, str]:
    return {n: c[n].succeed("cat /proc/sys/kernel/random/boot_id").strip() for n in names}


def test_nodes_of_one_image_are_who_their_credentials_say(cluster, site):
    assert cluster["filter1"].spec.image == cluster["filter2"].spec.image
    host_keys = set()
    for name in ("filter1", "filter2"):
        m, node = cluster[name], site.node(name)
        assert m.succeed("hostname").strip() == name
        assert f"inet {node.address}/" in m.succeed("ip -4 -o addr show")
        assert m.succeed("cat /var/lib/mailcluster/identity").split() == [name, "filter", str(node.address)]
        m.wait_for_unit("mailcluster-identity.service")
        host_keys.add(m.succeed("cat /etc/ssh/ssh_host_ed25519_key.pub").split()[1])
        # Only its own Ed25519 key: Debian's first-boot RSA and ECDSA keys cost 12 s of
        # every first boot under emulation, for nothing.
        assert m.succeed("ls /etc/ssh/ | grep '^ssh_host_.*_key$'").split() == ["ssh_host_ed25519_key"]
    assert len(host_keys) == 2, "two nodes of one image share an SSH host key"


def test_a_filter_added_later_joins_without_touching_the_others(cluster, grown_site, site):
    others = ("fe1", "filter1", "filter2", "store1")
    before = boot_ids(cluster, others)
    new = cluster.machine(grown_site.node("filter3"), site=grown_site)
    _live.append(new)
    # (an image given another role's credential stays out: test_identity.py)
    new.start()
    for unit in ("mailcluster-identity.service", "postfix.service", "rspamd.service"):
        new.wait_for_unit(unit, timeout=900)
    for name in others:  # (store2, in the site but not booted here, stays untold: that is retried)
        cluster[name].wait_until_succeeds("grep -qx 'node filter3 filter 10.77.0.23 active' /var/lib/mailcluster/members",
                                          timeout=300)
    wait_backends(cluster, {"filter1": "UP", "filter2": "UP", "filter3": "UP"}, timeout=180)

    batch = new_tokens(9)
    send_in_sessions(cluster, batch, per_session=1)  # round robin over three filters
    wait_in_mailboxes(cluster, [t for _, t in batch])  # store1 took mail from filter3 too
    log = new.succeed("journalctl -b --no-pager -u postfix")
    handled = [t for _, t in batch if f"message-id=<{t}@" in log]
    assert handled, "filter3 is UP in HAProxy but handled none of 9 sessions"
    assert boot_ids(cluster, others) == before, "a running node was rebooted"


def announce_as(m, peer_address: str, request: str, certified: bool = True) -> tuple[int, str]:
    """`request` sent as a compromised node would send it: with the node's own cluster key
    and certificate, or (certified=False) with a key of its own making that the site's
    node CA never signed."""
    key = ("read_credential mailcluster.cluster-key >$k; read_credential mailcluster.cluster-cert >$k-cert.pub; "
           "c=$k-cert.pub" if certified else "ssh-keygen -q -t ed25519 -N '' -f $k >/dev/null; c=")
    return m.execute(
        ". /usr/lib/mailcluster/members.sh; umask 077; k=$(mktemp -u -p /run); trap 'rm -f $k $k-cert.pub $k.pub' EXIT; "
        f"{key}; $(cluster_ssh $k $c) -n mcjoin@{peer_address} '{request}' 2>&1")


def test_a_joined_node_cannot_speak_for_another(cluster, site):
    """filter3, a member with its own certified key, tries to take store1's name and
    users, to take store1 over as store2 or as itself, and to have store1 forgotten; then,
    with a key the site's CA never signed, to join under a new name. Every member refuses,
    and mail keeps reaching store1."""
    evil, me = cluster["filter3"], NEW["address"]
    attempts = {
        f"join store1 mailstore {me} active alice@example.test": "filter3 cannot speak for store1",
        f"join filter3 mailstore {me} active alice@example.test": "filter3 is certified as a filter, not a mailstore",
        "takeover store2 store1": "filter3 cannot speak for store2",
        "takeover filter3 store1": "filter3 is not a mailstore",
        "forget store1": "store1 still serves",
    }
    for name in ("fe1", "filter1", "store1"):
        address = str(site.node(name).address)
        for request, why in attempts.items():
            if name == "store1" and request == "forget store1":
                why = "a node cannot be told to forget itself"  # (store1 refuses that first)
            rc, out = announce_as(evil, address, request)
            assert rc != 0 and f"refused: {why}" in out, (name, request, out)
        # A key of its own: sshd admits nobody the CA did not certify.
        rc, out = announce_as(evil, address, f"join evil filter {me} active", certified=False)
        assert rc != 0 and "Permission denied (publickey)" in out and "queued" not in out, (name, out)
    for name in ("fe1", "filter1", "filter2", "store1"):
        members = cluster[name].succeed("cat /var/lib/mailcluster/members")
        assert "node store1 mailstore 10.77.0.31 active" in members and "user alice@example.test store1" in members
        assert " evil " not in members and "node filter3 filter 10.77.0.23 active" in members
    assert "alice@example.test relay:[10.77.0.31]:25" in cluster["filter1"].succeed("cat /etc/postfix/transport")
    batch = new_tokens(2)
    send_in_sessions(cluster, batch, per_session=1)
    wait_in_mailboxes(cluster, [t for _, t in batch])


def test_a_node_removed_from_the_site_is_forgotten_everywhere(cluster, site):
    """filter3 leaves the site: powered off, then forgotten from one member; every node
    drops it (the frontend's HAProxy no longer lists it, no firewall admits it)."""
    gone = cluster["filter3"]
    gone.shutdown()
    out = cluster["filter1"].fail("mailcluster-forget store1")
    assert "store1 still serves" in out and "nothing changed" in out, out
    cluster["filter1"].succeed("mailcluster-forget filter3")
    for name in ("fe1", "filter1", "filter2", "store1"):
        # (the members file changes first, the daemons and the firewall right after)
        cluster[name].wait_until_succeeds(
            "! grep -q ' filter3 ' /var/lib/mailcluster/members && "
            f"! nft list set inet filter filters | grep -qF '{NEW['address']}'", timeout=300)
    assert "filter3" not in cluster["fe1"].succeed("cat /etc/haproxy/haproxy.cfg")
    # `systemctl reload haproxy` returns once the master is signalled; the new worker
    # takes over a few seconds later.
    try:
        retry(lambda last: set(backend_status(cluster)), timeout=120, interval=2,
              until=lambda seen: seen == {"filter1", "filter2"})
    except Timeout as e:
        raise AssertionError(f"HAProxy still balances over {sorted(e.last)}") from None
    # What is left still carries mail.
    batch = new_tokens(2)
    send_in_sessions(cluster, batch, per_session=1)
    wait_in_mailboxes(cluster, [t for _, t in batch])
