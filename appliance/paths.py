"""Where things live. Caches sit outside the checkout so a fresh clone reuses them."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROFILES = ROOT / "profiles"
OVERLAYS = ROOT / "overlays"
SITES = ROOT / "sites"
EXAMPLE_SITE = SITES / "example.yaml"
# What the operator makes lives in the checkout, or for the one-file builder
# (./build.py dist) in the directory it runs in.
WORK = Path(os.environ.get("MAILCLUSTER_WORKDIR", ROOT))
IMAGES = WORK / "images"
BUILD = WORK / "build"
# Generated secrets (keys, passwords), per site; never in git.
SECRETS = Path(os.environ.get("MAILCLUSTER_SECRETS", WORK / "secrets"))
# The newest release pull has accepted per repository and role: an older one is refused.
TRUSTED_RELEASES = Path(os.environ.get("MAILCLUSTER_TRUSTED_RELEASES", WORK / "trust" / "releases.json"))

# Shared by every checkout on the machine (CI's fresh clone included).
CACHE = Path(os.environ.get("MAILCLUSTER_CACHE", "/var/cache/mailcluster"))
STORE = CACHE / "store"          # finished images by input hash
MKOSI_CACHE = CACHE / "mkosi"    # incremental trees, one per role
PACKAGE_CACHE = CACHE / "packages"
INITRDS = CACHE / "initrd"       # the initrd every role shares, by input hash
LOCKS = CACHE / "locks"

# Debian's own tools first: mkosi's ukify needs python3-pefile under /usr/bin/python3, not
# a pyenv interpreter that may come first on the caller's PATH.
HOST_PATH = "/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"
