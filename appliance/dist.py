"""`./build.py dist`: the builder as one executable file.

A zipapp carrying the code, profiles, overlays, example site and the Python packages it
needs (pydantic's compiled core included, for this Python version and architecture). On
first run it unpacks itself once into ~/.cache/mailcluster/dist/<hash>/ (compiled
modules cannot be imported from a zip, and mkosi reads overlays from real files), then
runs with images, build trees and secrets in the current directory."""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import re
import shutil
import sys
import tempfile
import zipapp
from pathlib import Path

from . import paths
from .errors import ApplianceError

CONTENT = ("appliance", "profiles", "overlays", "sites", "build.py")

MAIN = '''\
import os, sys, zipfile
from pathlib import Path

here = Path(__file__).resolve().parent           # the .pyz itself
with zipfile.ZipFile(here) as z:
    stamp = z.read("DIST_HASH").decode().strip()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mailcluster" / "dist" / stamp
    if not (cache / "DIST_HASH").exists():
        tmp = cache.with_name(f".{stamp}.{os.getpid()}")
        z.extractall(tmp)
        try:
            tmp.rename(cache)
        except OSError:                          # another run unpacked it first
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
sys.path[:0] = [str(cache), str(cache / "vendor")]
# Images, build trees and secrets belong to the operator's directory, not the cache.
os.environ.setdefault("MAILCLUSTER_WORKDIR", os.getcwd())
from appliance.cli import main
main(prog_name=os.path.basename(sys.argv[0]))
'''


def _requirements(name: str, seen: set[str]) -> None:
    key = re.sub(r"[-_.]+", "-", name).lower()
    if key in seen:
        return
    seen.add(key)
    for req in md.requires(name) or []:
        if ";" in req and "extra ==" in req:
            continue
        if ";" in req and "Windows" in req:
            continue
        _requirements(re.split(r"[\s<>=!~;\[(]", req, maxsplit=1)[0], seen)


def dependencies() -> list[str]:
    text = (paths.ROOT / "pyproject.toml").read_text()
    m = re.search(r"^dependencies = \[(.*?)\]", text, re.S | re.M)
    if m is None:
        raise ApplianceError(f"{paths.ROOT / 'pyproject.toml'}: no dependencies = [...] list")
    block = m.group(1)
    seen: set[str] = set()
    for req in re.findall(r'"([^"]+)"', block):
        _requirements(re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0], seen)
    return sorted(seen)


def _copy_distribution(name: str, vendor: Path) -> None:
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        raise ApplianceError(f"Python package {name} is not installed", hint="pip install .") from None
    for f in dist.files or []:
        if f.parts[0].startswith("..") or "__pycache__" in f.parts or f.suffix == ".pyc":
            continue
        src = Path(str(dist.locate_file(f)))
        if src.is_file():
            dst = vendor / f
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)


def make(output: Path) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / "stage"
        stage.mkdir()
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        for item in CONTENT:
            src = paths.ROOT / item
            (shutil.copytree(src, stage / item, ignore=ignore) if src.is_dir() else shutil.copy2(src, stage / item))
        for name in dependencies():
            _copy_distribution(name, stage / "vendor")
        from .registry import _git_commit
        (stage / "VERSION").write_text(_git_commit() + "\n")
        h = hashlib.sha256()
        for f in sorted(p for p in stage.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(stage)).encode() + b"\0" + f.read_bytes())
        (stage / "DIST_HASH").write_text(h.hexdigest()[:16] + "\n")
        (stage / "__main__.py").write_text(MAIN)
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = output.with_name(f".{output.name}.tmp")
        zipapp.create_archive(stage, tmp_out, interpreter="/usr/bin/env python3", compressed=True)
        tmp_out.replace(output)
    return output


def python_tag() -> str:
    return f"cp{sys.version_info.major}{sys.version_info.minor}"
