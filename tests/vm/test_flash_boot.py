"""A flashed disk boots as its node: the image written onto a real block device (a loop
device), verified, with the identity `./build.py flash` put on its ESP, and nothing else."""
import pytest

from appliance import qemu
from appliance.vm import Machine
from tests.conftest import _live
from tests.tools import build_py, loop_device

# Its own group: one guest of its own, no shared cluster. While the "vm" group boots one
# single-vCPU guest at a time, the other core is mostly idle; this boot uses it.
pytestmark = [pytest.mark.vm, pytest.mark.xdist_group("flash")]


def test_a_flashed_loop_device_boots_as_the_node(tmp_path, test_images, site):
    node = site.node("fe1")
    with loop_device(tmp_path / "server-disk", 4 << 30) as dev:
        r = build_py("flash", str(test_images[node.role]), "--device", str(dev), "--node", node.name, "--yes",
                     env={"MAILCLUSTER_SECRETS": str(tmp_path / "secrets")})
        assert r.returncode == 0, r.stderr
        assert f"{dev}: {test_images[node.role].name} written and verified" in r.stdout

        # No SMBIOS credentials: what the node knows of itself comes from its own disk.
        spec = qemu.VMSpec(name="flashed", image=dev, block_device=dev, state_dir=tmp_path / "vm", agent=True)
        m = Machine(spec)
        _live.append(m)
        try:
            m.start()
            m.wait_for_boot()
            assert m.succeed("hostname").strip() == node.name
            assert m.succeed("cat /var/lib/mailcluster/identity").split() == [node.name, node.role, str(node.address)]
            assert f"inet {node.address}/" in m.succeed("ip -4 -o addr show")
            # Sealed on the ESP, opened by the node: nothing arrived unencrypted.
            m.fail("ls /run/credentials/@system")
            assert "mailcluster.cluster-key" in m.succeed("ls /run/credentials/@encrypted")
            m.wait_for_unit("haproxy.service")
        finally:
            _live.remove(m)
            m.close()
