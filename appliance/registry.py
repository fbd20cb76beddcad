"""Release images as OCI artifacts: publish to a registry, pull back and verify.

One artifact manifest per role holds the zstd-compressed disk image, its .bmap, the
package manifest, SHA256SUMS over all of them (and the uncompressed image) and an
OpenPGP signature of SHA256SUMS. An OCI index lists the roles; the tag is set last,
with the index, so an interrupted push leaves the tag where it was.

Trust comes from the signature, not from the registry: pull checks every blob against
its digest, the signature against keys the operator names, and every file against
SHA256SUMS, and refuses anything else."""
from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import paths
from .errors import ApplianceError
from .flash import HOST_PATH, ensure_bmap, recorded_sha256

INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
EMPTY = "application/vnd.oci.empty.v1+json"
ARTIFACT = "application/vnd.mailcluster.disk-image.v1"
MEDIA = {
    ".raw.zst": "application/vnd.mailcluster.disk.raw.zstd",
    ".bmap": "application/vnd.mailcluster.bmap+xml",
    ".manifest.json": "application/vnd.mailcluster.package-manifest+json",
    "SHA256SUMS": "text/plain; charset=utf-8",
    "SHA256SUMS.asc": "application/pgp-signature",
    "release": "text/plain; charset=utf-8",
}
TITLE = "org.opencontainers.image.title"
ROLE = "org.mailcluster.role"
CHUNK = 4 << 20
# What a registry may send, whatever it declares: manifests (OCI's own limit), the small
# signed files, and the compressed image.
MAX_MANIFEST = 4 << 20
MAX_SMALL_FILE = 16 << 20
MAX_IMAGE = 64 << 30
# The release statement every signed SHA256SUMS covers: which role, version and time.
RELEASE_FILE = "release"


class RegistryError(ApplianceError):
    exit_code = 5


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


# ---- references ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Ref:
    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> "Ref":
        m = re.fullmatch(r"(?P<reg>[\w.-]+(?::\d+)?)/(?P<repo>[a-z0-9]+(?:[._/-][a-z0-9]+)*)"
                         r"(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<dig>sha256:[0-9a-f]{64}))?", text)
        if not m or not (m["tag"] or m["dig"]):
            raise RegistryError(f"{text!r} is not a registry reference",
                                hint="write REGISTRY/REPOSITORY:TAG, e.g. registry.example.org/mail/appliance:2026.11")
        return cls(m["reg"], m["repo"], m["tag"], m["dig"])

    @property
    def reference(self) -> str:
        ref = self.digest or self.tag
        assert ref is not None   # parse() refuses a reference with neither
        return ref

    @property
    def base(self) -> str:
        host = self.registry.rsplit(":", 1)[0]
        # Plain HTTP only to this machine itself (a local test or mirror registry).
        scheme = "http" if host in ("127.0.0.1", "localhost", "[::1]") else "https"
        return f"{scheme}://{self.registry}"

    def __str__(self) -> str:
        return f"{self.registry}/{self.repository}" + (f":{self.tag}" if self.tag else "") + \
            (f"@{self.digest}" if self.digest else "")


# ---- credentials from where docker and podman keep them -----------------------------------
def auth_files() -> list[Path]:
    env = os.environ
    files = [env.get("REGISTRY_AUTH_FILE")]
    if env.get("XDG_RUNTIME_DIR"):
        files.append(f"{env['XDG_RUNTIME_DIR']}/containers/auth.json")
    home = Path.home()
    files += [str(home / ".config/containers/auth.json"),
              str(Path(env.get("DOCKER_CONFIG", home / ".docker")) / "config.json")]
    return [Path(f) for f in files if f]


def credentials_for(registry: str) -> tuple[str, str] | None:
    """(user, password) from MAILCLUSTER_REGISTRY_USERNAME/PASSWORD, else the first auth
    file (podman's, then docker's) that has an entry for the registry."""
    user, pw = os.environ.get("MAILCLUSTER_REGISTRY_USERNAME"), os.environ.get("MAILCLUSTER_REGISTRY_PASSWORD")
    if user and pw:
        return user, pw
    for f in auth_files():
        try:
            auths = json.loads(f.read_text()).get("auths", {})
        except (OSError, ValueError):
            continue
        for key, entry in auths.items():
            host = re.sub(r"^https?://", "", key).split("/")[0]
            if host == registry and entry.get("auth"):
                u, _, p = base64.b64decode(entry["auth"]).decode().partition(":")
                return u, p
    return None


# ---- the distribution API ------------------------------------------------------------------
def _origin(url: str) -> tuple[str, str, int | None]:
    u = urllib.parse.urlsplit(url)
    return u.scheme, (u.hostname or "").lower(), u.port or {"http": 80, "https": 443}.get(u.scheme)


class _SameOriginAuth(urllib.request.HTTPRedirectHandler):
    """Redirects keep the registry credentials only within the registry's own origin
    (blob downloads are often redirected to storage elsewhere)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _origin(req.full_url) != _origin(newurl):
            new.remove_header("Authorization")
        return new


_opener = urllib.request.build_opener(_SameOriginAuth)


def _read_capped(resp, limit: int, what: str) -> bytes:
    data = resp.read(limit + 1)
    if len(data) > limit:
        raise RegistryError(f"{what}: the registry sent more than {limit} bytes; refused, nothing was kept")
    return data


class Client:
    def __init__(self, ref: Ref, timeout: float = 60):
        self.ref = ref
        self.timeout = timeout
        self._auth: str | None = None
        self._creds = credentials_for(ref.registry)

    def _url(self, path: str) -> str:
        return path if path.startswith("http") else f"{self.ref.base}/v2/{self.ref.repository}/{path}"

    def request(self, method: str, path: str, data=None, headers: dict | None = None, ok=(200,)):
        url = self._url(path)
        for attempt in (1, 2):
            req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
            if self._auth:
                req.add_header("Authorization", self._auth)
            try:
                resp = _opener.open(req, timeout=self.timeout)
            except urllib.error.HTTPError as e:
                if e.code == 401 and attempt == 1 and self._authenticate(e.headers.get("WWW-Authenticate", "")):
                    if hasattr(data, "seek"):
                        data.seek(0)
                    continue
                if e.code in ok:
                    return e
                body = e.read(2000).decode(errors="replace")
                raise RegistryError(f"{self.ref.registry}: {method} {urllib.parse.urlparse(url).path} "
                                    f"answered {e.code} {e.reason}: {_registry_message(body)}",
                                    hint=_hint_for(e.code, self.ref)) from None
            except (urllib.error.URLError, OSError) as e:
                reason = getattr(e, "reason", e)
                raise RegistryError(f"cannot reach registry {self.ref.registry}: {reason}",
                                    hint="check the address and that the registry is running; nothing was changed there")\
                    from None
            if resp.status not in ok:
                raise RegistryError(f"{self.ref.registry}: {method} {url} answered {resp.status}")
            return resp
        raise RegistryError(f"{self.ref.registry}: authentication failed", hint=_hint_for(401, self.ref))

    def _authenticate(self, challenge: str) -> bool:
        scheme, _, params = challenge.partition(" ")
        fields = dict(re.findall(r'(\w+)="([^"]*)"', params))
        basic = None
        if self._creds:
            basic = "Basic " + base64.b64encode(f"{self._creds[0]}:{self._creds[1]}".encode()).decode()
        if scheme.lower() == "basic":
            self._auth = basic
            return basic is not None
        if scheme.lower() == "bearer" and "realm" in fields:
            q = {k: v for k, v in fields.items() if k in ("service", "scope")}
            req = urllib.request.Request(f"{fields['realm']}?{urllib.parse.urlencode(q)}")
            if basic:
                req.add_header("Authorization", basic)
            try:
                with _opener.open(req, timeout=self.timeout) as r:
                    tok = json.loads(_read_capped(r, 1 << 20, f"{self.ref.registry} token"))
            except (urllib.error.URLError, OSError, ValueError) as e:
                raise RegistryError(f"{self.ref.registry}: getting a token from {fields['realm']} failed: {e}",
                                    hint=_hint_for(401, self.ref)) from None
            self._auth = "Bearer " + (tok.get("token") or tok.get("access_token", ""))
            return True
        return False

    def blob_exists(self, digest: str) -> bool:
        return self.request("HEAD", f"blobs/{digest}", ok=(200, 404)).status == 200

    def push_blob(self, path: Path, digest: str) -> None:
        if self.blob_exists(digest):
            return
        resp = self.request("POST", "blobs/uploads/", data=b"", ok=(202,))
        loc = urllib.parse.urljoin(self.ref.base + "/", resp.headers["Location"])
        sep = "&" if "?" in loc else "?"
        size = path.stat().st_size
        with open(path, "rb") as fh:
            self.request("PUT", f"{loc}{sep}digest={digest}", data=fh, ok=(201,),
                         headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)})

    def put_manifest(self, reference: str, body: bytes, media_type: str) -> str:
        resp = self.request("PUT", f"manifests/{reference}", data=body, ok=(201,),
                            headers={"Content-Type": media_type})
        return resp.headers.get("Docker-Content-Digest") or "sha256:" + hashlib.sha256(body).hexdigest()

    def get_manifest(self, reference: str) -> tuple[bytes, str]:
        resp = self.request("GET", f"manifests/{reference}", headers={"Accept": f"{INDEX}, {MANIFEST}"})
        body = _read_capped(resp, MAX_MANIFEST, f"{self.ref}: manifest {reference}")
        return body, resp.headers.get("Content-Type", "").split(";")[0]

    def get_blob(self, digest: str, dest: Path, size: int, limit: int) -> None:
        """Fetch a blob of the declared `size` (refused above `limit`), reading no byte
        past it: a registry that sends more is refused, not believed."""
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= limit:
            raise RegistryError(f"{self.ref}: blob {dest.name} is declared as {size!r} bytes; "
                                f"at most {limit} are accepted; refused, nothing was kept")
        resp = self.request("GET", f"blobs/{digest}")
        h = hashlib.sha256()
        left = size
        with open(dest, "wb") as out:
            while left > 0 and (chunk := resp.read(min(CHUNK, left))):
                h.update(chunk)
                out.write(chunk)
                left -= len(chunk)
            if left > 0 or resp.read(1):
                raise RegistryError(f"{self.ref}: blob {dest.name} is not the declared {size} bytes long "
                                    f"({'shorter' if left > 0 else 'longer'}); refused, nothing was kept")
        if "sha256:" + h.hexdigest() != digest:
            raise RegistryError(f"{self.ref}: blob {dest.name} does not match its digest {digest}: tampered with or "
                                "damaged in the registry; refused, nothing was kept", hint="publish the release again")


def _registry_message(body: str) -> str:
    try:
        errs = json.loads(body).get("errors", [])
        return "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errs) or body.strip()
    except ValueError:
        return body.strip()[:300]


def _hint_for(code: int, ref: Ref) -> str:
    if code in (401, 403):
        return (f"log in to {ref.registry} (podman login / docker login, or set MAILCLUSTER_REGISTRY_USERNAME "
                "and MAILCLUSTER_REGISTRY_PASSWORD)")
    if code == 404:
        return f"check the repository and tag: {ref}"
    return "see the registry's log"


# ---- publishing ----------------------------------------------------------------------------
@dataclass
class Release:
    role: str
    digest: str                 # the role's manifest
    files: dict[str, str]       # file name -> blob digest


def _git_commit() -> str:
    if (paths.ROOT / "VERSION").exists():  # the one-file builder records it (./build.py dist)
        return (paths.ROOT / "VERSION").read_text().strip()
    r = subprocess.run(["git", "-C", str(paths.ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if r.returncode != 0:
        return "unknown"
    dirty = subprocess.run(["git", "-C", str(paths.ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return r.stdout.strip() + ("-dirty" if dirty else "")


def _sign(sums: Path, key: str) -> Path:
    sig = sums.with_name("SHA256SUMS.asc")
    sig.unlink(missing_ok=True)
    r = subprocess.run(["gpg", "--batch", "--yes", "--armor", "--local-user", key, "--detach-sign",
                        "--output", str(sig), str(sums)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RegistryError(f"signing with OpenPGP key {key!r} failed: {r.stderr.strip().splitlines()[-1:]}",
                            hint="name a secret key in your gpg keyring (gpg --list-secret-keys); nothing was pushed")
    return sig


def release_statement(role: str, version: str, repository: str, created: str) -> str:
    return f"role={role}\nversion={version}\nrepository={repository}\ncreated={created}\n"


def parse_release(text: str) -> dict[str, str]:
    fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    if set(fields) != {"role", "version", "repository", "created"}:
        raise RegistryError("the signed release statement is malformed; refused")
    try:
        dt.datetime.fromisoformat(fields["created"])
    except ValueError:
        raise RegistryError(f"the signed release statement has no valid date ({fields['created']!r}); refused") from None
    return fields


def stage_role(image: Path, role: str, key: str, log: Callable[[str], None],
               version: str = "", repository: str = "") -> tuple[Path, dict]:
    """The files of one role's release in a directory of their own, signed. What is
    signed names the role, the version, the repository and the time of publishing, so
    an older signed release cannot be passed off as a newer one."""
    expected = recorded_sha256(image)
    info = json.loads(image.with_name(image.name.removesuffix(".raw") + ".manifest.json").read_text())
    stage = paths.CACHE / "publish" / expected
    zst = stage / f"{role}.raw.zst"
    stage.mkdir(parents=True, exist_ok=True)
    if not zst.exists():
        log(f"{role}: compressing {image.name} (zstd)")
        tmp = zst.with_name(zst.name + ".tmp")
        r = subprocess.run(["zstd", "-q", "-f", "-T0", "-6", str(image), "-o", str(tmp)], capture_output=True, text=True)
        if r.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise RegistryError(f"compressing {image} failed: {r.stderr.strip()}",
                                hint="check free space under " + str(paths.CACHE))
        tmp.replace(zst)
    if sha256_file(image) != expected:
        raise RegistryError(f"{image} does not match its recorded checksum: corrupted; nothing was pushed",
                            hint="build the image again")
    shutil.copyfile(ensure_bmap(image), stage / f"{role}.bmap")
    shutil.copyfile(image.with_name(image.name.removesuffix(".raw") + ".manifest.json"), stage / f"{role}.manifest.json")
    created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")
    (stage / RELEASE_FILE).write_text(release_statement(role, version, repository, created))
    files = [f"{role}.raw.zst", f"{role}.bmap", f"{role}.manifest.json", RELEASE_FILE]
    lines = [f"{expected}  {role}.raw\n"] + [f"{sha256_file(stage / f)}  {f}\n" for f in files]
    (stage / "SHA256SUMS").write_text("".join(lines))
    _sign(stage / "SHA256SUMS", key)
    return stage, info


def debian_snapshot(info: dict) -> str:
    """The Debian archive an image was built from, as one annotation value."""
    suites = info.get("debian_archive")
    if not suites:  # an image built before the builder recorded the archive
        return f"{info.get('distribution', 'debian trixie')}, packages as of {info.get('built_at', '')}"
    return "; ".join(f"{suite} as published {v['date']}" for suite, v in sorted(suites.items()))


def publish(ref: Ref, images: dict[str, Path], key: str, version: str | None,
            log: Callable[[str], None], push_blob=None) -> tuple[str, list[Release]]:
    """Push every role's release, then the index under the tag. Returns the index digest.
    The version in the annotations defaults to the tag."""
    if not ref.tag or ref.digest:
        raise RegistryError(f"{ref}: publish needs a tag (REGISTRY/REPO:TAG)")
    version = version or ref.tag
    client = Client(ref)
    client.request("GET", f"{ref.base}/v2/", ok=(200,))   # reachable and logged in, before any work
    push_blob = push_blob or client.push_blob
    commit = _git_commit()
    releases, entries = [], []
    for role, image in images.items():
        stage, info = stage_role(image, role, key, log, version, ref.repository)
        empty = stage / "empty.json"
        empty.write_bytes(b"{}")
        layers, files = [], {}
        for name in (f"{role}.raw.zst", f"{role}.bmap", f"{role}.manifest.json", RELEASE_FILE,
                     "SHA256SUMS", "SHA256SUMS.asc"):
            path = stage / name
            digest = "sha256:" + sha256_file(path)
            log(f"{role}: pushing {name} ({path.stat().st_size / 1e6:.1f} MB)")
            push_blob(path, digest)
            media = next(v for k, v in MEDIA.items() if name == k or name.endswith(k))
            layers.append({"mediaType": media, "digest": digest, "size": path.stat().st_size,
                           "annotations": {TITLE: name}})
            files[name] = digest
        empty_digest = "sha256:" + sha256_file(empty)
        push_blob(empty, empty_digest)
        annotations = {
            ROLE: role,
            "org.opencontainers.image.version": version,
            "org.opencontainers.image.revision": commit,
            "org.opencontainers.image.created": info.get("built_at", ""),
            "org.mailcluster.input-hash": info.get("input_hash", ""),
            # The Debian archive the packages came from: each suite as published then
            # (InRelease dates); the exact versions are in the package manifest layer.
            "org.mailcluster.debian": debian_snapshot(info),
            "org.mailcluster.site": info.get("site", ""),
        }
        manifest = {"schemaVersion": 2, "mediaType": MANIFEST, "artifactType": ARTIFACT,
                    "config": {"mediaType": EMPTY, "digest": empty_digest, "size": 2},
                    "layers": layers, "annotations": annotations}
        body = json.dumps(manifest, indent=2, sort_keys=True).encode()
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        client.put_manifest(digest, body, MANIFEST)
        releases.append(Release(role, digest, files))
        entries.append({"mediaType": MANIFEST, "digest": digest, "size": len(body), "artifactType": ARTIFACT,
                        "annotations": {ROLE: role}})
    index = {"schemaVersion": 2, "mediaType": INDEX, "artifactType": ARTIFACT, "manifests": entries,
             "annotations": {"org.opencontainers.image.version": version,
                             "org.opencontainers.image.revision": commit,
                             "org.opencontainers.image.created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}}
    body = json.dumps(index, indent=2, sort_keys=True).encode()
    index_digest = client.put_manifest(ref.tag, body, INDEX)
    return index_digest, releases


# ---- pulling -------------------------------------------------------------------------------
def _gpgv(sums: Path, sig: Path, trust: Path) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        keyring = Path(tmp) / "trusted.gpg"
        data = trust.read_bytes()
        if b"-----BEGIN PGP" in data:
            dearmored = subprocess.run(["gpg", "--dearmor"], input=data, capture_output=True)
            if dearmored.returncode != 0:
                raise RegistryError(f"{trust}: not an OpenPGP public key file")
            data = dearmored.stdout
        keyring.write_bytes(data)
        r = subprocess.run(["gpgv", "--keyring", str(keyring), str(sig), str(sums)], capture_output=True, text=True,
                           env={**os.environ, "PATH": HOST_PATH})
    if r.returncode != 0:
        raise RegistryError("the release's signature does not verify with the trusted keys "
                            f"({trust}): {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else 'bad signature'}; "
                            "refused, nothing was kept",
                            hint="the release was tampered with or signed by another key")
    return r.stderr


def resolve(client: Client, role: str) -> tuple[str, dict]:
    """The role's manifest (digest, parsed) behind the reference, which names an index or a manifest."""
    body, media = client.get_manifest(client.ref.reference)
    if client.ref.digest and "sha256:" + hashlib.sha256(body).hexdigest() != client.ref.digest:
        raise RegistryError(f"{client.ref}: the registry's answer does not match the digest asked for; refused")
    doc = json.loads(body)
    if doc.get("mediaType", media) == INDEX:
        match = [m for m in doc.get("manifests", []) if m.get("annotations", {}).get(ROLE) == role]
        if not match:
            roles = [m.get("annotations", {}).get(ROLE) for m in doc.get("manifests", [])]
            raise RegistryError(f"{client.ref} has no {role} image (it has: {', '.join(map(str, roles))})")
        digest = match[0]["digest"]
        body, _ = client.get_manifest(digest)
        if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
            raise RegistryError(f"{client.ref}: manifest of {role} does not match its digest; refused")
        doc = json.loads(body)
        return digest, doc
    return "sha256:" + hashlib.sha256(body).hexdigest(), doc


def _trusted_state() -> dict[str, str]:
    try:
        return json.loads(paths.TRUSTED_RELEASES.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise RegistryError(f"{paths.TRUSTED_RELEASES}: cannot read the releases trusted so far: {e}",
                            hint="restore it from a backup; deleting it forgets which releases were seen") from None


def _trusted(key: str) -> str | None:
    return _trusted_state().get(key)


def _trust(key: str, created: str) -> None:
    paths.TRUSTED_RELEASES.parent.mkdir(parents=True, exist_ok=True)
    state = _trusted_state()
    state[key] = created
    tmp = paths.TRUSTED_RELEASES.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    tmp.replace(paths.TRUSTED_RELEASES)


def pull(ref: Ref, role: str, trust: Path, output: Path, log: Callable[[str], None],
         allow_older: bool = False) -> Path:
    """Fetch and verify one role's release into `output`; returns the .raw. Nothing is kept
    unless everything verifies, and a release older than one already accepted from the
    same repository is refused unless `allow_older`."""
    client = Client(ref)
    digest, manifest = resolve(client, role)
    if manifest.get("annotations", {}).get(ROLE) not in (None, role):
        raise RegistryError(f"{ref}: the manifest is for {manifest['annotations'][ROLE]}, not {role}; refused")
    layers = {l.get("annotations", {}).get(TITLE): l for l in manifest.get("layers", [])}
    for need in ("SHA256SUMS", "SHA256SUMS.asc"):
        if need not in layers:
            raise RegistryError(f"{ref}: the {role} release has no {need}: unsigned releases are refused; nothing was kept",
                                hint="publish it again with ./build.py publish, which signs")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        for name in ("SHA256SUMS", "SHA256SUMS.asc"):
            client.get_blob(layers[name]["digest"], tmp / name, layers[name].get("size"), MAX_SMALL_FILE)
        signer = _gpgv(tmp / "SHA256SUMS", tmp / "SHA256SUMS.asc", trust)
        sums = {}
        for line in (tmp / "SHA256SUMS").read_text().splitlines():
            d, _, n = line.partition("  ")
            sums[n] = d
        if RELEASE_FILE not in layers or RELEASE_FILE not in sums:
            raise RegistryError(f"{ref}: the {role} release has no signed release statement (role, version, date); "
                                "refused, nothing was kept", hint="publish it again with this version of ./build.py")
        for name, layer in layers.items():
            if name in ("SHA256SUMS", "SHA256SUMS.asc"):
                continue
            if not name or "/" in name or name not in sums:
                raise RegistryError(f"{ref}: file {name!r} is not covered by the signed SHA256SUMS; refused")
            log(f"{role}: fetching {name} ({layer['size'] / 1e6:.1f} MB)")
            client.get_blob(layer["digest"], tmp / name, layer.get("size"),
                            MAX_IMAGE if name.endswith(".raw.zst") else MAX_SMALL_FILE)
            if sha256_file(tmp / name) != sums[name]:
                raise RegistryError(f"{ref}: {name} does not match the signed SHA256SUMS; refused")
        release = parse_release((tmp / RELEASE_FILE).read_text())
        if release["role"] != role or release["repository"] != ref.repository:
            raise RegistryError(f"{ref}: the signed release is {release['role']} of {release['repository']}, "
                                f"not {role} of {ref.repository}; refused")
        key = f"{ref.registry}/{ref.repository}/{role}"
        seen = _trusted(key)
        if seen and dt.datetime.fromisoformat(release["created"]) < dt.datetime.fromisoformat(seen) and not allow_older:
            raise RegistryError(f"{ref}: this {role} release ({release['version']}, published {release['created']}) "
                                f"is older than one already accepted from {ref.registry}/{ref.repository} "
                                f"(published {seen}); refused, nothing was kept",
                                hint="a registry can replay an old signed release under a new tag; "
                                     "pass --allow-older only to roll back on purpose")
        raw = tmp / f"{role}.raw"
        log(f"{role}: decompressing")
        r = subprocess.run(["zstd", "-q", "-d", "--sparse", "-f", str(tmp / f"{role}.raw.zst"), "-o", str(raw)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RegistryError(f"{ref}: decompressing {role}.raw.zst failed: {r.stderr.strip()}")
        if sha256_file(raw) != sums.get(f"{role}.raw"):
            raise RegistryError(f"{ref}: the decompressed {role}.raw does not match the signed SHA256SUMS; refused")
        (tmp / f"{role}.raw.zst").unlink()
        (tmp / "pulled-from").write_text(f"{ref}\n{digest}\n{release['version']} {release['created']}\n{signer}")
        if output.exists():
            shutil.rmtree(output)
        tmp.replace(output)
        if not seen or release["created"] > seen:
            _trust(key, release["created"])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output / f"{role}.raw"


def pull_role(text: str, role: str, trust: Path | None, log: Callable[[str], None]) -> Path:
    """For flash: the verified image of `role` from a reference, cached by manifest digest."""
    if trust is None:
        raise RegistryError("flashing from a registry needs --trust KEYFILE: the OpenPGP public key releases are signed with")
    ref = Ref.parse(text)
    out = paths.CACHE / "pulled" / re.sub(r"[^\w.-]", "_", f"{ref.registry}_{ref.repository}_{ref.reference}") / role
    return pull(ref, role, trust, out, log)
