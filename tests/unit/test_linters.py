"""Static checks are tests: shellcheck over every shell script the images carry, ruff over
the Python and mypy over the builder (their settings are in pyproject.toml)."""
import os
import re
import subprocess
import sys

from appliance import paths
from appliance.host import HOST_PATH
from tests.tools import script_lib


def overlay_scripts() -> list[str]:
    """Every file in overlays/ that is a shell script: a bash/sh shebang, or a sourced
    library that names its shell for shellcheck."""
    found = []
    for f in sorted(paths.OVERLAYS.rglob("*")):
        if f.is_file() and not f.is_symlink():
            head = f.read_bytes()[:2000].decode(errors="replace")
            if re.match(r"#!/(usr/)?bin/(env )?(ba)?sh\b", head) or "# shellcheck shell=" in head:
                found.append(str(f))
    return found


def test_every_overlay_script_passes_shellcheck(tmp_path):
    scripts = overlay_scripts()
    assert len(scripts) >= 19  # the count when this test came: none may drop out unseen
    # Sourced libraries live at run time in /usr/lib/mailcluster; shellcheck is told
    # where they are in the tree with -P (search path) and -x (follow them). The plan's
    # constants are rendered by the builder: a mailstore's, which names every constant.
    rendered = script_lib(tmp_path / "lib", "mailstore")
    (rendered / "members.sh").unlink()
    libs = ":".join(str(d) for d in [rendered, *sorted({p.parent for p in paths.OVERLAYS.rglob("*.sh")})])
    r = subprocess.run(["shellcheck", "-x", "-P", libs, "--severity=warning", *scripts],
                       capture_output=True, text=True, env={"PATH": HOST_PATH})
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_python_passes_ruff():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise",
                        "appliance", "tests", "bench", "build.py"],
                       cwd=paths.ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_builder_passes_mypy():
    # --cache-dir=/dev/null: mypy writes no .mypy_cache into the checkout (a cold run).
    r = subprocess.run([sys.executable, "-m", "mypy", "--config-file", "pyproject.toml", "--cache-dir", os.devnull],
                       cwd=paths.ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_test_module_has_a_name_of_its_own():
    """pytest imports test modules by their base name (tests/unit and tests/vm are not
    packages): a second test_X.py anywhere fails the whole run's collection."""
    seen: dict[str, list[str]] = {}
    for path in sorted((paths.ROOT / "tests").rglob("test_*.py")):
        seen.setdefault(path.name, []).append(str(path.relative_to(paths.ROOT)))
    assert not {name: where for name, where in seen.items() if len(where) > 1}
