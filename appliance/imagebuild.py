"""The mkosi driver: render → hash → build (once per hash) → publish into images/.

Finished images live in a content-addressed store outside the checkout, keyed by a hash
of the rendered mkosi configuration (which captures profiles, overlays and the site) plus
this driver's own source and the mkosi version. A hash that is already in the store is
never built again, so a fresh clone on the same machine and every xdist worker reuse it.
Nothing appears in the store or in images/ until a build has fully succeeded.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from . import archive, paths
from .paths import HOST_PATH
from .errors import BuildError
from .plan import Plan
from .profiles import ProfileSet
from .render import render, render_initrd, tree_hash
from .site import Site

KEEP_PER_VARIANT = 2


@dataclass(frozen=True)
class Artifact:
    variant: str
    input_hash: str
    raw: Path
    manifest: Path
    built: bool  # False when reused from the store

    @property
    def info(self) -> dict:
        return json.loads(self.manifest.read_text())


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    paths.LOCKS.mkdir(parents=True, exist_ok=True)
    with open(paths.LOCKS / f"{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def mkosi_version() -> str:
    try:
        out = subprocess.run(["mkosi", "--version"], capture_output=True, text=True,
                             env={**os.environ, "PATH": HOST_PATH}, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "missing"
    return out.strip()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def step_times(steps: list[tuple[float, str]], end: float) -> list[dict]:
    """mkosi's step lines with how long each ran (until the next step began)."""
    ends = [t for t, _ in steps[1:]] + [end]
    return [{"step": name, "seconds": round(e - t, 1)} for (t, name), e in zip(steps, ends)]


class Builder:
    def __init__(self, profiles: ProfileSet, site: Site, log: Callable[[str], None] = print,
                 build_root: Path = paths.BUILD, images_root: Path = paths.IMAGES):
        self.profiles = profiles
        self.site = site
        self.log = log
        self.build_root = build_root
        self.images_root = images_root
        self._archive: archive.ArchiveState | None = None
        self._initrd: tuple[Path, Path] | None = None  # its configuration, its file

    @property
    def archive_state(self) -> archive.ArchiveState:
        """What Debian has published, asked once per builder (one `build` command)."""
        if self._archive is None:
            self._archive = archive.current()
        return self._archive

    def _salt(self) -> bytes:
        # The Debian archive's state is an input too: a published security update is a
        # new image.
        return Path(__file__).read_bytes() + mkosi_version().encode() + self.archive_state.token.encode()

    def plan(self, role: str, extra: tuple[str, ...] = ()) -> Plan:
        return Plan.of(self.profiles, self.site, role, extra)

    def render(self, role: str, extra: tuple[str, ...] = ()) -> tuple[Path, str]:
        return self._render(self.plan(role, extra))

    def _render(self, plan: Plan) -> tuple[Path, str]:
        dest = self.build_root / self.site.name / plan.variant
        render(plan, dest, paths.MKOSI_CACHE / plan.role, paths.PACKAGE_CACHE, self.initrd_path())
        return dest, tree_hash(dest, self._salt())

    def _initrd_config(self) -> tuple[Path, Path]:
        """The initrd's rendered configuration, and where the initrd built from it is."""
        if self._initrd is None:
            dest = self.build_root / ".initrd"  # not a site name: those are never dotted
            with locked(f"initrd-config-{self.build_root.as_posix().replace('/', '_')}"):
                render_initrd(dest, paths.PACKAGE_CACHE)
                self._initrd = (dest, paths.INITRDS / tree_hash(dest, self._salt()) / "initrd")
        return self._initrd

    def initrd_path(self) -> Path:
        """Where the initrd of every role's UKI is, built or not: it is built once per
        mkosi, archive state and configuration, and its path names that hash, so a new
        initrd makes a new image."""
        return self._initrd_config()[1]

    def _ensure_initrd(self) -> None:
        """Build the shared initrd if it is not there yet (under the build lock)."""
        config, done = self._initrd_config()
        if done.exists():
            return
        self.log(f"initrd: building the initrd every role shares ({done.parent.name[:12]})")
        self._run_mkosi_initrd(config, done)

    def _run_mkosi_initrd(self, config: Path, done: Path) -> None:
        staging = paths.INITRDS / f".tmp-{done.parent.name}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            self._mkosi("initrd", config, staging)
            # mkosi writes initrd.cpio.zst and a link to it named initrd
            built = [p for p in staging.iterdir() if p.name.startswith("initrd.cpio") and not p.is_symlink()]
            if len(built) != 1:
                raise BuildError(f"initrd: mkosi wrote {sorted(p.name for p in staging.iterdir())}, "
                                 "expected one initrd.cpio*")
            (staging / "initrd").unlink(missing_ok=True)
            built[0].rename(staging / "initrd")
            final = done.parent
            shutil.rmtree(final, ignore_errors=True)
            staging.rename(final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        # The newest few stay: images in the store name theirs, and a rebuild reuses it.
        olds = sorted((d for d in paths.INITRDS.iterdir() if not d.name.startswith(".") and d != final),
                      key=lambda d: d.stat().st_mtime, reverse=True)
        for d in olds[KEEP_PER_VARIANT:]:
            shutil.rmtree(d, ignore_errors=True)

    def build(self, role: str, extra: tuple[str, ...] = (), refresh: bool = False) -> Artifact:
        plan = self.plan(role, extra)
        # Rendering rewrites the build directory that mkosi reads: one process per variant.
        with locked(f"variant-{self.site.name}-{plan.variant}"):
            return self._build_locked(plan, refresh)

    def _build_locked(self, plan: Plan, refresh: bool) -> Artifact:
        role, variant = plan.role, plan.variant
        builddir, digest = self._render(plan)
        store = paths.STORE / digest
        if not refresh and (store / "complete").exists():
            self.log(f"{variant}: up to date ({digest[:12]}), reusing {store}")
            return self._publish(plan, digest, built=False)
        # One build at a time: two cores, and every role shares the package cache.
        with locked("build"):
            if not refresh and (store / "complete").exists():
                self.log(f"{variant}: built meanwhile by another process, reusing it")
                return self._publish(plan, digest, built=False)
            self._run_mkosi(role, variant, builddir, digest, refresh)
        self._collect_garbage(variant)
        return self._publish(plan, digest, built=True)

    def _run_mkosi(self, role: str, variant: str, builddir: Path, digest: str, refresh: bool) -> None:
        paths.STORE.mkdir(parents=True, exist_ok=True)
        paths.MKOSI_CACHE.joinpath(role).mkdir(parents=True, exist_ok=True)
        self._ensure_initrd()
        staging = paths.STORE / f".tmp-{digest}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        cache = paths.MKOSI_CACHE / role
        if not refresh and not archive.cache_is_from(cache, self.archive_state):
            self.log(f"{variant}: Debian's package indexes differ from those {role}'s cache was built from: "
                     "resolving every package afresh")
            refresh = True
        try:
            elapsed, steps, logpath = self._mkosi(variant, builddir, staging, refresh, f"input {digest[:12]}")
            raw = staging / f"{role}.raw"
            if not raw.exists():
                raise BuildError(f"{variant}: mkosi succeeded but wrote no {raw.name}", hint=f"full mkosi log: {logpath}")
            archive.record_cache_state(cache, self.archive_state)
            self._write_manifest(staging, role, variant, digest, elapsed, logpath, steps)
            (staging / "complete").touch()
            final = paths.STORE / digest
            shutil.rmtree(final, ignore_errors=True)
            staging.rename(final)
            self.log(f"{variant}: built in {elapsed:.0f} s")
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _mkosi(self, what: str, config: Path, outdir: Path, refresh: bool = False,
               note: str = "") -> tuple[float, list[dict], Path]:
        """One mkosi build of `config` into `outdir`, logged; its time and its steps' times."""
        for d in (paths.PACKAGE_CACHE, paths.CACHE / "logs", paths.CACHE / "work"):
            d.mkdir(parents=True, exist_ok=True)
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        logpath = paths.CACHE / "logs" / f"{self.site.name}-{what}-{stamp}.log"
        cmd = ["mkosi", "--directory", str(config), "--output-dir", str(outdir),
               "--workspace-dir", str(paths.CACHE / "work"), "--force", "build"]
        if refresh:
            cmd.insert(-1, "--force")  # -ff: also drop the incremental cache, re-resolve packages
        self.log(f"{what}: building with mkosi ({note + '; ' if note else ''}log {logpath})")
        started = time.monotonic()
        with open(logpath, "w") as log:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    errors="replace", env={**os.environ, "PATH": HOST_PATH})
            assert proc.stdout
            steps: list[tuple[float, str]] = []  # when each of mkosi's steps began
            for line in proc.stdout:
                log.write(line)
                if line.startswith("‣"):
                    steps.append((time.monotonic() - started, line.lstrip("‣ ").rstrip()))
                if line.startswith("‣ ") and not line.startswith("‣  "):
                    self.log(f"{what}: [{steps[-1][0]:5.0f} s] {line[2:].rstrip()}")
            rc = proc.wait()
        if rc != 0:
            raise BuildError(self._explain_failure(what, logpath, rc), hint=f"full mkosi log: {logpath}")
        elapsed = time.monotonic() - started
        return elapsed, step_times(steps, elapsed), logpath

    @staticmethod
    def _explain_failure(variant: str, logpath: Path, rc: int) -> str:
        lines = logpath.read_text(errors="replace").splitlines()
        for i, line in enumerate(lines):
            if line.startswith(("CONFIG CHECK FAILED", "POSTINST FAILED")):
                detail = [l for l in lines[i:i + 25] if not l.startswith("‣")]
                what = ("a rendered configuration was rejected by its checker" if line.startswith("CONFIG")
                        else "a profile's postinst command failed inside the image")
                return f"{variant}: {what}:\n  " + "\n  ".join(detail)
        step = next((l[2:] for l in reversed(lines) if l.startswith("‣  ")), "unknown step")
        tail = "\n  ".join(lines[-25:])
        return f"{variant}: mkosi failed (exit {rc}) during: {step.strip()}\n  last lines of the log:\n  {tail}"

    def _write_manifest(self, staging: Path, role: str, variant: str, digest: str, elapsed: float, logpath: Path,
                        steps: list[dict]) -> None:
        raw = staging / f"{role}.raw"
        packages = []
        mk_manifest = staging / f"{role}.manifest"
        if mk_manifest.exists():
            data = json.loads(mk_manifest.read_text())
            packages = [{"name": p["name"], "version": p["version"], "architecture": p.get("architecture")}
                        for p in data.get("packages", [])]
        st = raw.stat()
        manifest = {
            "site": self.site.name,
            "role": role,
            "variant": variant,
            "input_hash": digest,
            "built_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "build_seconds": round(elapsed, 1),
            # Where the build's time went, step by step (bench/build_time.py reads it).
            "build_steps": steps,
            "mkosi": mkosi_version(),
            "distribution": "debian trixie",
            # Each suite's InRelease date and package index checksum when the image was built.
            "debian_archive": self.archive_state.suites,
            "image": {"file": raw.name, "sha256": sha256_file(raw),
                      "apparent_bytes": st.st_size, "allocated_bytes": st.st_blocks * 512},
            "packages": packages,
            "log": str(logpath),
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

    def _publish(self, plan: Plan, digest: str, built: bool) -> Artifact:
        """Hard-link the store's files into images/<site>/ and refresh SHA256SUMS there."""
        store = paths.STORE / digest
        info = json.loads((store / "manifest.json").read_text())
        image, manifest = plan.image(self.images_root), plan.manifest(self.images_root)
        outdir = image.parent
        outdir.mkdir(parents=True, exist_ok=True)
        targets = {store / info["image"]["file"]: image, store / "manifest.json": manifest}
        for src, dst in targets.items():
            tmp = dst.with_name(f".{dst.name}.tmp")
            tmp.unlink(missing_ok=True)
            if dst.exists() and dst.samefile(src):
                continue  # rename() between two links to one inode would do nothing
            try:
                os.link(src, tmp)
            except OSError:  # a different filesystem: copy, sparsely
                subprocess.run(["cp", "--sparse=always", str(src), str(tmp)], check=True)
            tmp.replace(dst)
        sums = []
        for m in sorted(outdir.glob("*.manifest.json")):
            meta = json.loads(m.read_text())
            sums.append(f"{meta['image']['sha256']}  {meta['variant']}.raw\n")
        (outdir / "SHA256SUMS").write_text("".join(sums))
        return Artifact(plan.variant, digest, image, manifest, built)

    def _collect_garbage(self, variant: str) -> None:
        """Keep the newest few store entries per site and variant; images/ links keep theirs alive."""
        entries = []
        for d in paths.STORE.iterdir():
            m = d / "manifest.json"
            if d.name.startswith(".") or not m.exists():
                continue
            meta = json.loads(m.read_text())
            if meta.get("site") == self.site.name and meta.get("variant") == variant:
                entries.append((m.stat().st_mtime, d))
        for _, d in sorted(entries, reverse=True)[KEEP_PER_VARIANT:]:
            shutil.rmtree(d, ignore_errors=True)
