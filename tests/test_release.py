"""Release workflows without booting: flash refusals and verification on real loop
devices, publishing to a real registry (Debian's docker-registry) and pulling back."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from appliance import flash, qemu, registry
from appliance.wait import retry
from tests.tools import build_py, digest, loop_device

pytestmark = pytest.mark.xdist_group("release")
ROLE = "frontend"
NODE = "fe1"


@pytest.fixture(scope="module")
def image(test_images) -> Path:
    return test_images[ROLE]


@pytest.fixture(scope="module")
def gnupg(tmp_path_factory):
    """A release signing key in a keyring of its own, and its public half as a file."""
    home = tmp_path_factory.mktemp("gnupg")
    home.chmod(0o700)
    env = {"GNUPGHOME": str(home)}
    for uid in ("Release Signer <release@example.org>", "Someone Else <other@example.org>"):
        subprocess.run(["gpg", "--batch", "--passphrase", "", "--quick-gen-key", uid, "ed25519", "sign", "never"],
                       env={**os.environ, **env}, check=True, capture_output=True)
    pub = home / "release.asc"
    pub.write_bytes(subprocess.run(["gpg", "--armor", "--export", "release@example.org"], env={**os.environ, **env},
                                   check=True, capture_output=True).stdout)
    yield env, pub
    # gpg started an agent for this keyring; it would outlive the run.
    subprocess.run(["gpgconf", "--kill", "gpg-agent"], env={**os.environ, **env}, capture_output=True)


@pytest.fixture(scope="module")
def registry_url(tmp_path_factory):
    """Debian's docker-registry on 127.0.0.1, storing under a temporary directory."""
    yield from serve_registry(tmp_path_factory.mktemp("registry"))


def serve_registry(d: Path, extra: str = "", ready=(200,)):
    port = qemu.free_port()
    (d / "config.yml").write_text(f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
                                  f"    rootdirectory: {d}/data\nhttp:\n  addr: 127.0.0.1:{port}\n{extra}")
    log = open(d / "log", "w")
    proc = subprocess.Popen(["docker-registry", "serve", str(d / "config.yml")], stdout=log, stderr=log,
                            start_new_session=True)

    def up(last: bool) -> bool:
        assert proc.poll() is None, f"docker-registry exited: {(d / 'log').read_text()}"
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2).status in ready
        except urllib.error.HTTPError as e:
            return e.code in ready
        except OSError:
            return False

    try:
        retry(up, timeout=30, interval=0.2)
        yield f"127.0.0.1:{port}", d / "data"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def published(registry_url, gnupg, image):
    host, _ = registry_url
    env, _ = gnupg
    r = build_py("publish", "--to", f"{host}/mail/appliance:2026.11", "--role", ROLE, "--layer", "test",
                 "--sign-key", "release@example.org", env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout


def skopeo_raw(ref: str) -> bytes:
    return subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
                          check=True, capture_output=True).stdout


# ---- flash ---------------------------------------------------------------------------------
def test_flash_refuses_a_mounted_device_and_changes_nothing(tmp_path, image):
    with loop_device(tmp_path / "disk", 3 << 30) as dev:
        data = tmp_path / "data"
        data.mkdir()
        (data / "keep").write_text("operator data")
        subprocess.run(["mkfs.ext4", "-q", "-d", str(data), str(dev)], check=True)
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        # Read-only: a read-write ext4 writes on its own (lazy init, journal), which would
        # hide whether flash wrote anything.
        subprocess.run(["mount", "-o", "ro", str(dev), str(mnt)], check=True)
        try:
            before = digest(dev)
            r = build_py("flash", str(image), "--device", str(dev), "--node", NODE, "--yes")
            assert r.returncode == flash.FlashError.exit_code
            assert f"{dev} is in use ({dev} is mounted on {mnt})" in r.stderr
            assert "nothing was written" in r.stderr and "unmount it" in r.stderr
            assert digest(dev) == before
        finally:
            subprocess.run(["umount", str(mnt)], check=True)


def test_flash_refuses_a_device_smaller_than_the_image(tmp_path, image):
    with loop_device(tmp_path / "small", 256 << 20) as dev:
        with open(dev, "wb") as fh:
            fh.write(b"old contents " * 1000)
        before = digest(dev)
        r = build_py("flash", str(image), "--device", str(dev), "--node", NODE, "--yes")
        assert r.returncode == flash.FlashError.exit_code
        assert f"{dev} is too small: 0.27 GB for a {image.stat().st_size / 1e9:.2f} GB image" in r.stderr
        assert digest(dev) == before


def test_flash_refuses_a_regular_file_unless_asked(tmp_path, image):
    target = tmp_path / "server.img"
    target.write_bytes(b"a file that is not a disk\n")
    r = build_py("flash", str(image), "--device", str(target), "--node", NODE, "--yes")
    assert r.returncode == flash.FlashError.exit_code
    assert f"{target} is a regular file, not a block device" in r.stderr and "--to-file" in r.stderr
    assert target.read_bytes() == b"a file that is not a disk\n"
    assert not list(tmp_path.glob(".*partial"))


def test_flash_asks_first_showing_the_device(tmp_path, image):
    with loop_device(tmp_path / "disk", 3 << 30) as dev:
        r = build_py("flash", str(image), "--device", str(dev), "--node", NODE, input="n\n")
        assert r.returncode == 1
        assert f"onto {dev} (loop device backed by {tmp_path / 'disk'}, 3.2 GB) as {NODE}?" in r.stderr
        assert digest(dev, 1 << 20) == hashlib.sha256(bytes(1 << 20)).hexdigest()


def test_a_corrupted_byte_in_the_image_is_detected_before_writing(tmp_path, image):
    copy = tmp_path / image.name
    subprocess.run(["cp", "--sparse=always", str(image), str(copy)], check=True)
    shutil.copy(image.parent / "SHA256SUMS", tmp_path)
    bm = flash.load_bmap(flash.ensure_bmap(image))
    start, length = bm.span(bm.ranges[len(bm.ranges) // 2])  # somewhere in the root file system
    with open(copy, "r+b") as fh:
        fh.seek(start + length // 2)
        b = fh.read(1)
        fh.seek(start + length // 2)
        fh.write(bytes([b[0] ^ 0x01]))
    target = tmp_path / "out.img"
    r = build_py("flash", str(copy), "--device", str(target), "--node", NODE, "--to-file", "--yes")
    assert r.returncode == flash.FlashError.exit_code
    assert f"{copy} is corrupted" in r.stderr and "nothing was written" in r.stderr
    assert not target.exists()


def test_flash_to_a_file_is_the_image_plus_sealed_credentials(tmp_path, image):
    target = tmp_path / "out.img"
    r = build_py("flash", str(image), "--device", str(target), "--node", NODE, "--to-file", "--yes",
                 env={"MAILCLUSTER_SECRETS": str(tmp_path / "secrets")})
    assert r.returncode == 0, r.stderr
    assert "written and verified" in r.stdout
    assert flash.esp_credentials(target) == ["mailcluster.cluster-cert", "mailcluster.cluster-key", "mailcluster.node",
                                             "mailcluster.node-ca", "mailcluster.peers",
                                             "network.network.10-cluster", "system.hostname"]
    # Only the ESP differs from the image: every byte outside it is the image's.
    start, size = flash.esp_extent(target)
    assert digest(target, start) == digest(image, start)
    assert digest(target, offset=start + size) == digest(image, offset=start + size)


# ---- publish and pull ---------------------------------------------------------------------
def test_publish_pushes_what_an_independent_client_sees(published, registry_url):
    host, _ = registry_url
    index_digest = published.strip().splitlines()[-1].split()[-1]
    index = skopeo_raw(f"{host}/mail/appliance:2026.11")
    assert "sha256:" + hashlib.sha256(index).hexdigest() == index_digest
    role_line = next(l for l in published.splitlines() if l.startswith(f"{ROLE}: "))
    role_digest = role_line.split("@")[1]
    assert [m["digest"] for m in json.loads(index)["manifests"]] == [role_digest]
    manifest_bytes = skopeo_raw(f"{host}/mail/appliance@{role_digest}")
    assert "sha256:" + hashlib.sha256(manifest_bytes).hexdigest() == role_digest
    manifest = json.loads(manifest_bytes)
    printed = dict(l.split() for l in published.splitlines() if l.startswith("  "))
    assert {l["annotations"]["org.opencontainers.image.title"]: l["digest"] for l in manifest["layers"]} == printed
    assert set(printed) == {f"{ROLE}.raw.zst", f"{ROLE}.bmap", f"{ROLE}.manifest.json", "release", "SHA256SUMS",
                            "SHA256SUMS.asc"}
    notes = manifest["annotations"]
    assert notes["org.mailcluster.role"] == ROLE and notes["org.opencontainers.image.version"] == "2026.11"
    assert len(notes["org.opencontainers.image.revision"]) >= 40 and notes["org.opencontainers.image.created"]


def test_pull_gets_back_the_identical_image(published, registry_url, gnupg, image, tmp_path):
    host, _ = registry_url
    _, pub = gnupg
    r = build_py("pull", f"{host}/mail/appliance:2026.11", "--role", ROLE, "--trust", str(pub),
                 "--output", str(tmp_path / "pulled"))
    assert r.returncode == 0, r.stderr
    raw = tmp_path / "pulled" / ROLE / f"{ROLE}.raw"
    assert digest(raw) == digest(image)
    assert "Release Signer" in (raw.parent / "pulled-from").read_text()


def _republish_with(host: str, role_digest: str, change) -> str:
    """Push a copy of the role's manifest changed by `change` (an attacker with write access
    to the registry); returns the new tag."""
    ref = registry.Ref.parse(f"{host}/mail/appliance@{role_digest}")
    client = registry.Client(ref)
    manifest = json.loads(client.get_manifest(role_digest)[0])
    change(client, manifest)
    body = json.dumps(manifest).encode()
    tag = "evil-" + hashlib.sha256(body).hexdigest()[:8]
    client.put_manifest(tag, body, registry.MANIFEST)
    return tag


def _role_digest(published: str) -> str:
    return next(l for l in published.splitlines() if l.startswith(f"{ROLE}: ")).split("@")[1]


def test_pull_refuses_a_release_without_signature(published, registry_url, gnupg, tmp_path):
    host, _ = registry_url
    _, pub = gnupg

    def drop_signature(client, manifest):
        manifest["layers"] = [l for l in manifest["layers"]
                              if l["annotations"]["org.opencontainers.image.title"] != "SHA256SUMS.asc"]

    tag = _republish_with(host, _role_digest(published), drop_signature)
    r = build_py("pull", f"{host}/mail/appliance:{tag}", "--role", ROLE, "--trust", str(pub),
                 "--output", str(tmp_path / "pulled"))
    assert r.returncode == registry.RegistryError.exit_code
    assert "has no SHA256SUMS.asc: unsigned releases are refused" in r.stderr
    assert not [p for p in (tmp_path / "pulled").rglob("*") if p.is_file()]


def test_pull_refuses_changed_checksums_and_a_tampered_blob(published, registry_url, gnupg, tmp_path):
    host, storage = registry_url
    _, pub = gnupg

    def forge_sums(client, manifest):
        sums = tmp_path / "SHA256SUMS"
        sums.write_text("0" * 64 + f"  {ROLE}.raw\n")
        d = "sha256:" + hashlib.sha256(sums.read_bytes()).hexdigest()
        client.push_blob(sums, d)
        for l in manifest["layers"]:
            if l["annotations"]["org.opencontainers.image.title"] == "SHA256SUMS":
                l.update(digest=d, size=sums.stat().st_size)

    tag = _republish_with(host, _role_digest(published), forge_sums)
    r = build_py("pull", f"{host}/mail/appliance:{tag}", "--role", ROLE, "--trust", str(pub),
                 "--output", str(tmp_path / "a"))
    assert r.returncode == registry.RegistryError.exit_code
    assert "signature does not verify with the trusted keys" in r.stderr

    # The registry's own copy of a blob changed on its disk.
    bmap_digest = dict(l.split() for l in published.splitlines() if l.startswith("  "))[f"{ROLE}.bmap"]
    blob = storage / "docker/registry/v2/blobs/sha256" / bmap_digest[7:9] / bmap_digest[7:] / "data"
    original = blob.read_bytes()
    blob.write_bytes(original.replace(b"<BlockSize>", b"<BLOCKSize>", 1))  # (same length: a digest check)
    try:
        r = build_py("pull", f"{host}/mail/appliance:2026.11", "--role", ROLE, "--trust", str(pub),
                     "--output", str(tmp_path / "b"))
    finally:
        blob.write_bytes(original)
    assert r.returncode == registry.RegistryError.exit_code
    assert f"blob {ROLE}.bmap does not match its digest" in r.stderr
    assert not [p for p in (tmp_path / "b").rglob("*") if p.is_file()]


def test_pull_refuses_a_release_signed_by_an_untrusted_key(published, registry_url, gnupg, tmp_path):
    host, _ = registry_url
    env, _ = gnupg
    other = tmp_path / "other.asc"
    other.write_bytes(subprocess.run(["gpg", "--armor", "--export", "other@example.org"], env={**os.environ, **env},
                                     check=True, capture_output=True).stdout)
    r = build_py("pull", f"{host}/mail/appliance:2026.11", "--role", ROLE, "--trust", str(other),
                 "--output", str(tmp_path / "pulled"))
    assert r.returncode == registry.RegistryError.exit_code
    assert "signature does not verify with the trusted keys" in r.stderr


def test_pull_refuses_an_older_signed_release_under_a_newer_tag(registry_url, gnupg, image, tmp_path):
    """What is signed names the role, version and time: a registry that moves a tag back
    to an older signed release is caught, unless the operator rolls back on purpose."""
    host, _ = registry_url
    env, pub = gnupg
    state = {"MAILCLUSTER_TRUSTED_RELEASES": str(tmp_path / "trusted.json")}
    repo = f"{host}/mail/replay"
    for version in ("2026.11", "2026.12"):
        r = build_py("publish", "--to", f"{repo}:{version}", "--role", ROLE, "--layer", "test",
                     "--sign-key", "release@example.org", env=env)
        assert r.returncode == 0, r.stderr
    r = build_py("pull", f"{repo}:2026.12", "--role", ROLE, "--trust", str(pub), "--output", str(tmp_path / "new"),
                 env=state)
    assert r.returncode == 0, r.stderr
    assert "2026.12" in (tmp_path / "new" / ROLE / "pulled-from").read_text()
    # Whoever can write to the registry points "latest" at the old, validly signed release.
    client = registry.Client(registry.Ref.parse(f"{repo}:2026.11"))
    body, media = client.get_manifest("2026.11")
    client.put_manifest("latest", body, media)
    r = build_py("pull", f"{repo}:latest", "--role", ROLE, "--trust", str(pub), "--output", str(tmp_path / "old"),
                 env=state)
    assert r.returncode == registry.RegistryError.exit_code, r.stderr
    assert "release (2026.11, published" in r.stderr and "is older than one already accepted" in r.stderr
    assert not [p for p in (tmp_path / "old").rglob("*") if p.is_file()]
    r = build_py("pull", f"{repo}:latest", "--role", ROLE, "--trust", str(pub), "--output", str(tmp_path / "back"),
                 "--allow-older", env=state)
    assert r.returncode == 0, r.stderr
    assert digest(tmp_path / "back" / ROLE / f"{ROLE}.raw") == digest(image)


def test_an_interrupted_publish_leaves_the_tag_where_it_was(published, registry_url, gnupg, image):
    host, _ = registry_url
    env, _ = gnupg
    before = skopeo_raw(f"{host}/mail/appliance:2026.11")
    ref = registry.Ref.parse(f"{host}/mail/appliance:2026.11")
    client = registry.Client(ref)
    pushed = []

    def push_then_drop(path, d):
        if len(pushed) == 2:
            raise ConnectionResetError("connection to the registry lost")
        pushed.append(path)
        client.push_blob(path, d)

    os.environ.update(env)
    try:
        with pytest.raises(ConnectionResetError):
            registry.publish(ref, {ROLE: image}, "release@example.org", "2026.12", log=lambda m: None,
                             push_blob=push_then_drop)
    finally:
        for k in env:
            os.environ.pop(k)
    assert skopeo_raw(f"{host}/mail/appliance:2026.11") == before


def test_an_unreachable_registry_is_named(gnupg):
    env, _ = gnupg
    port = qemu.free_port()
    r = build_py("publish", "--to", f"127.0.0.1:{port}/mail/appliance:x", "--role", ROLE, "--layer", "test",
                 "--sign-key", "release@example.org", env=env)
    assert r.returncode == registry.RegistryError.exit_code
    assert f"cannot reach registry 127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr


def test_flash_takes_a_registry_reference(published, registry_url, gnupg, tmp_path, image):
    host, _ = registry_url
    _, pub = gnupg
    target = tmp_path / "server.img"
    r = build_py("flash", f"{host}/mail/appliance:2026.11", "--trust", str(pub), "--device", str(target),
                 "--node", NODE, "--to-file", "--yes")
    assert r.returncode == 0, r.stderr
    start, size = flash.esp_extent(target)
    assert digest(target, offset=start + size) == digest(image, offset=start + size)


# ---- the one-file builder ------------------------------------------------------------------
def test_dist_is_one_file_that_runs_without_the_checkout(tmp_path):
    pyz = tmp_path / "mailcluster.pyz"
    r = build_py("dist", "--output", str(pyz))
    assert r.returncode == 0, r.stderr
    op = tmp_path / "operator"
    op.mkdir()

    def run(*args):
        # -I -S: no site-packages, no PYTHONPATH: everything must come from the file.
        return subprocess.run([sys.executable, "-I", "-S", str(pyz), *args], cwd=op, capture_output=True, text=True,
                              env={"PATH": os.environ["PATH"], "HOME": str(tmp_path / "home")}, timeout=300)

    out = run("--help")
    assert out.returncode == 0, out.stderr
    for command in ("build", "run", "flash", "publish", "pull"):
        assert re.search(rf"^  {command}\s", out.stdout, re.M), out.stdout
    shown, expected = run("show", "frontend", "--json"), build_py("show", "frontend", "--json")
    assert shown.returncode == 0, shown.stderr
    for key in ("packages", "services", "ports", "partitions", "checks"):
        assert json.loads(shown.stdout)[key] == json.loads(expected.stdout)[key]
    # What the operator makes lands in the directory the file runs in.
    made = run("credentials", "fe1", "--format", "files", "--output", "creds")
    assert made.returncode == 0, made.stderr
    assert (op / "creds" / "system.hostname").read_text() == "fe1"
    assert (op / "secrets" / "example" / "node-ca").exists()


def test_registry_credentials_come_from_the_auth_file(tmp_path, monkeypatch):
    """A registry that wants a login: refused with what to do, then accepted with the
    entry `docker login` writes; the password never appears on a command line."""
    from appliance.passwords import crypt, gensalt
    d = tmp_path / "registry"
    d.mkdir()
    (d / "htpasswd").write_text("publisher:" + crypt("s3cret", gensalt("$2b$")) + "\n")
    served = serve_registry(d, f"auth:\n  htpasswd:\n    realm: test\n    path: {d}/htpasswd\n", ready=(401,))
    host, _ = next(served)
    try:
        for var in ("REGISTRY_AUTH_FILE", "MAILCLUSTER_REGISTRY_USERNAME", "MAILCLUSTER_REGISTRY_PASSWORD"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("HOME", str(tmp_path))
        monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
        monkeypatch.delenv("DOCKER_CONFIG", raising=False)
        blob = tmp_path / "blob"
        blob.write_bytes(b"release notes")
        d_blob = "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()
        ref = registry.Ref.parse(f"{host}/mail/appliance:x")
        with pytest.raises(registry.RegistryError) as e:
            registry.Client(ref).push_blob(blob, d_blob)
        assert "401" in e.value.message and "docker login" in e.value.hint

        (tmp_path / ".docker").mkdir()
        auth = base64.b64encode(b"publisher:s3cret").decode()
        (tmp_path / ".docker" / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))
        registry.Client(ref).push_blob(blob, d_blob)
        assert registry.Client(ref).blob_exists(d_blob)
    finally:
        next(served, None)
