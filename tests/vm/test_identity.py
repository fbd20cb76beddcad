"""A role's image made into a node of another role stays out of service: its identity
unit refuses the credential and says why, and nothing that serves mail starts. One
guest of its own, off the shared cluster (a refused node never reaches the cluster;
the members' refusal of a node speaking for another role: test_membership.py)."""
import pytest

from appliance import qemu
from appliance.credentials import node_credentials
from appliance.vm import Machine
from tests.conftest import _live

# Its own group: one guest, beside the "vm" group's single-vCPU guests, on the core they
# leave idle (as test_flash_boot.py).
pytestmark = [pytest.mark.vm, pytest.mark.xdist_group("identity")]


def test_a_filter_image_given_a_mailstores_identity_takes_no_mail(tmp_path, test_images, site, secrets):
    node = site.node("filter2")
    creds = node_credentials(site, node, None, secrets)
    creds["mailcluster.node"] = f"{node.name} mailstore {node.address}\n".encode()  # the wrong role
    spec = qemu.VMSpec(name="wrong-role", image=test_images["filter"], state_dir=tmp_path / "vm",
                       smp=qemu.CLUSTER_SMP, credentials=creds, agent=True)
    m = Machine(spec)
    _live.append(m)
    try:
        m.start()
        m.wait_until_succeeds("systemctl is-failed -q mailcluster-identity.service", timeout=300)
        assert ("credential mailcluster.node is for a mailstore, but this is the filter image"
                in m.journal("mailcluster-identity.service"))
        assert m.succeed("systemctl show -P ActiveState postfix.service").strip() != "active"
        assert m.execute("ss -Hltn 'sport = :25' | grep -q .")[0] != 0, "port 25 open without an identity"
        m.fail("test -e /var/lib/mailcluster/identity")
    finally:
        _live.remove(m)
        m.close()
