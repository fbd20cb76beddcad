"""Each role image boots cleanly, serves its ports, and the harness itself behaves:
private network, block/unblock, failing units reported at once, crash then start."""
import re

import pytest

from appliance.acme import serves_https
from appliance.plan import Plan
from appliance.qemu import wait_for_banner
from tests.conftest import TEST_LAYERS

# One xdist group: guests of different modules never compete for the 2 cores.
pytestmark = [pytest.mark.vm, pytest.mark.xdist_group("vm")]

NODES = {"frontend": "fe1", "filter": "filter1", "mailstore": "store1"}
# postscreen greets a client it does not know yet with "220-" and a pause.
GREETING = {25: b"220", 143: b"* OK", 22: b"SSH-2.0-"}


@pytest.fixture(scope="module")
def cluster(mail_cluster):
    return mail_cluster


@pytest.mark.parametrize("role", sorted(NODES))
def test_role_boots_clean_with_services_listening(cluster, profiles, site, role):
    m = cluster[NODES[role]]
    m.wait_for_boot()  # raises with the failed units' journals if anything failed
    assert m.succeed("hostname").strip() == NODES[role]  # identity from the credential
    # Under emulation the root disk may appear minutes into the boot, and a unit may take
    # minutes to start: the guest waits 10 minutes for each, not systemd's default 90 s
    # (appliance/qemu.py EMULATION_CMDLINE).
    assert m.succeed("systemctl show -P DefaultDeviceTimeoutUSec").strip() == "10min"
    assert m.succeed("systemctl show -P DefaultTimeoutStartUSec").strip() == "10min"
    for unit in profiles.get(role).services.enable:
        if m.execute(f"systemctl is-enabled {unit}")[1].strip() == "masked":
            continue  # the test layer masks the backup timer: tests start each backup
        needs = re.findall(r"^ConditionCredential=(\|?)(\S+)$", m.succeed(f"systemctl cat {unit}"), re.M)
        present = {c: m.execute(f"test -e /run/credentials/@system/{c}")[0] == 0 for _, c in needs}
        either = [present[c] for bar, c in needs if bar]  # '|': any one of them will do
        if not all(present[c] for bar, c in needs if not bar) or (either and not any(either)):
            # ACME's and MTA-STS's units start only where the site uses them, which it
            # says with the credential they need (the booted node has settled).
            assert m.succeed(f"systemctl show -P ActiveState {unit}").strip() == "inactive", unit
            continue
        m.wait_for_unit(unit, timeout=600)  # rspamd loads its rules for minutes under TCG
    acme = cluster.site.tls.acme is not None and cluster.site.tls.acme.dns_update is None  # HTTP-01
    for name, p in Plan.of(profiles, site, role, TEST_LAYERS).ports.items():
        if (name == "acme-challenge" and not acme) or (name == "https" and not serves_https(cluster.site)):
            continue  # nothing listens without them (test_hardening: refused, not dropped)
        m.wait_for_open_port(p.port)
        # This host is outside the site: only the ports open to the world greet it (the
        # firewall tests in test_hardening.py check the others from inside the cluster).
        if p.port in GREETING and "world" in p.allow:
            wait_for_banner(m.forward(p.port), GREETING[p.port], timeout=60)


def test_guests_reach_each_other_on_the_private_network(cluster, site):
    fe = cluster["fe1"]
    assert f"{site.node('fe1').address}/24" in fe.succeed("ip -4 -o addr show")
    fe.wait_until_succeeds(f"ping -c1 -W2 {site.node('filter1').address}", timeout=60)
    banner = fe.succeed(f"exec 3<>/dev/tcp/{site.node('filter1').address}/22; head -c8 <&3")
    assert banner == "SSH-2.0-"


def test_block_cuts_the_cluster_link_but_not_the_control_channel(cluster, site):
    fe, flt = cluster["fe1"], cluster["filter1"]
    target = site.node("filter1").address
    fe.wait_until_succeeds(f"ping -c1 -W2 {target}", timeout=60)
    flt.block()
    try:
        fe.fail(f"ping -c2 -W2 {target}")
        assert flt.succeed("echo still-here").strip() == "still-here"
    finally:
        flt.unblock()
    fe.wait_until_succeeds(f"ping -c1 -W2 {target}", timeout=60)


def test_wait_for_unit_fails_at_once_with_the_journal(cluster):
    m = cluster["filter1"]
    m.execute("systemd-run --unit=doomed --service-type=oneshot sh -c 'echo doomed-by-design; exit 3'")
    try:
        with pytest.raises(AssertionError) as exc:
            m.wait_for_unit("doomed.service", timeout=900)
        assert "unit doomed.service failed" in str(exc.value)
        assert "doomed-by-design" in str(exc.value)  # the unit's journal is attached
    finally:
        # A failed unit leaves the shared node "degraded", which later modules' boot
        # checks rightly refuse.
        m.succeed("systemctl reset-failed doomed.service")

