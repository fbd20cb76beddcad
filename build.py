#!/usr/bin/env python3
"""./build.py COMMAND: build, boot, flash and publish the mail cluster's images."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

try:
    from appliance.cli import main
except ModuleNotFoundError as e:  # before `pip install .` on a fresh machine
    sys.exit(f"error: Python module {e.name!r} is missing\nhint: run: python3 -m pip install .")

if __name__ == "__main__":
    main()
