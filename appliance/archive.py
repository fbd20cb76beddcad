"""The Debian archive the images are built from, and what it holds right now.

Every build asks Debian for the state of trixie, trixie-updates and trixie-security: the
checksums of their package indexes, read from each suite's InRelease file. That state is
part of every image's input hash, so an image is rebuilt as soon as Debian publishes a
package (a security update above all), and a state the role's mkosi cache was not built
from makes mkosi resolve every package afresh instead of reusing the cached tree.
Unchanged, nothing is rebuilt. The manifest records the state an image was built from.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import BuildError

# (mirror, suite): the only package sources of every image.
SUITES = [
    ("http://deb.debian.org/debian", "trixie"),
    ("http://deb.debian.org/debian", "trixie-updates"),
    ("http://deb.debian.org/debian-security", "trixie-security"),
]
INDEX = "main/binary-amd64/Packages.xz"
# Set once for a whole run by the test suite, so that every worker and every build in
# it agrees on one state even if Debian publishes something meanwhile.
PIN_ENV = "MAILCLUSTER_ARCHIVE_STATE"


def apt_sources() -> str:
    """deb822 sources for mkosi's package manager tree, one stanza per mirror."""
    by_mirror: dict[str, list[str]] = {}
    for mirror, suite in SUITES:
        by_mirror.setdefault(mirror, []).append(suite)
    return "\n".join(
        f"Types: deb\nURIs: {mirror}\nSuites: {' '.join(suites)}\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n" for mirror, suites in by_mirror.items())


@dataclass(frozen=True)
class ArchiveState:
    suites: dict[str, dict[str, str]]   # suite -> {"date": InRelease Date, "packages_sha256": ...}

    @property
    def token(self) -> str:
        """Changes exactly when a suite's package index changes (not its signature date)."""
        return hashlib.sha256(json.dumps(
            {s: v["packages_sha256"] for s, v in sorted(self.suites.items())}).encode()).hexdigest()

    def to_json(self) -> str:
        return json.dumps(self.suites, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ArchiveState":
        return cls(json.loads(text))


def parse_inrelease(text: str, url: str) -> dict[str, str]:
    date = re.search(r"^Date: (.+)$", text, re.M)
    index = re.search(r"^SHA256:\n((?: .*\n)+)", text, re.M)
    digest = None
    if index:
        for line in index.group(1).splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[2] == INDEX:
                digest = parts[0]
    if not date or not digest:
        raise BuildError(f"{url}: not a Debian InRelease file listing {INDEX}",
                         hint="check that deb.debian.org is reachable directly (no captive portal or proxy page)")
    return {"date": date.group(1).strip(), "packages_sha256": digest}


def current(timeout: float = 30) -> ArchiveState:
    """The archive as it is now (or as pinned for this run)."""
    pinned = os.environ.get(PIN_ENV)
    if pinned:
        return ArchiveState.from_json(pinned)
    suites = {}
    for mirror, suite in SUITES:
        url = f"{mirror}/dists/{suite}/InRelease"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                text = r.read().decode("utf-8", "replace")
        except (urllib.error.URLError, OSError) as e:
            raise BuildError(f"cannot read {url} to learn which packages Debian has published: {e}",
                             hint="images are built from the live Debian archive; check this host's network "
                                  "and DNS for deb.debian.org, then build again") from None
        suites[suite] = parse_inrelease(text, url)
    return ArchiveState(suites)


def cache_is_from(cache_dir: Path, state: ArchiveState) -> bool:
    """Whether mkosi's incremental cache in `cache_dir` was built from `state`."""
    try:
        return ArchiveState.from_json((cache_dir / "archive-state.json").read_text()).token == state.token
    except (OSError, ValueError):
        return False


def record_cache_state(cache_dir: Path, state: ArchiveState) -> None:
    (cache_dir / "archive-state.json").write_text(state.to_json() + "\n")
