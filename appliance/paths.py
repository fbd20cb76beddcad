"""Where things live. Caches sit outside the checkout so a fresh clone reuses them."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROFILES = ROOT / "profiles"
OVERLAYS = ROOT / "overlays"
SITES = ROOT / "sites"
EXAMPLE_SITE = SITES / "example.yaml"
IMAGES = ROOT / "images"
BUILD = ROOT / "build"
# Generated secrets (keys, passwords), per site; never in git.
SECRETS = Path(os.environ.get("MAILCLUSTER_SECRETS", ROOT / "secrets"))

# Shared by every checkout on the machine (CI's fresh clone included).
CACHE = Path(os.environ.get("MAILCLUSTER_CACHE", "/var/cache/mailcluster"))
STORE = CACHE / "store"          # finished images by input hash
MKOSI_CACHE = CACHE / "mkosi"    # incremental trees, one per role
PACKAGE_CACHE = CACHE / "packages"
LOCKS = CACHE / "locks"
