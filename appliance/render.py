"""Render one role's complete mkosi configuration into a build directory.

The directory is generated and never edited by hand. Each layer (base → hardened → role →
extra layers → site) becomes one `mkosi.conf.d/` drop-in so mkosi does the merging, one
systemd preset file so systemd does the enabling, and its overlays become extra trees
rendered from the site model.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import sys
import traceback
from pathlib import Path

import jinja2

from . import archive
from .errors import ConfigError
from .plan import CONSTANTS_PATH, Plan
from .profiles import Partition, Profile

DISTRIBUTION = ("debian", "trixie")

# The initrd only needs what finds and mounts the root disk; mkosi 24.3 otherwise packs
# every module (133 MB UKI). crc32c: ext4 metadata checksums fail without it.
INITRD_MODULES = [
    "virtio", "virtio_.*", "ext4", "crc32c.*", "libcrc32c", "vfat", "nls_cp437",
    "nls_iso8859-1", "efivarfs", "autofs4", "configfs", "loop", "dm-mod", "sd_mod",
    "ahci", "nvme", "nvme_core", "xhci_pci", "usb_storage", "scsi_mod",
]

CONSOLE_CMDLINE = ["console=ttyS0,115200", "systemd.firstboot=off", "systemd.show_status=auto"]

# Debian's postfix postinst needs an FQDN; nodes get their real names from credentials.
SKELETON = {
    "etc/mailname": "unprovisioned.invalid\n",
    "etc/hostname": "unprovisioned\n",
}


# This exact file name replaces mkosi's own list, which adds an unreachable debian-debug
# repository. The suites come from appliance/archive.py, which also tracks their state.
APT_SOURCES = archive.apt_sources()


# mkosi splits most list settings on commas; these few on spaces.
_SPACE_LISTS = {"KernelCommandLine", "KernelCommandLineExtra", "Environment"}


def _ini_value(key: str, v: object) -> str:
    if isinstance(v, list):
        items = [str(x) for x in v]
        sep = " " if key in _SPACE_LISTS else ","
        if any(sep in x or not x for x in items):
            raise ConfigError(f"mkosi setting {key}: item {next(x for x in items if sep in x or not x)!r} "
                              f"is empty or contains the list separator {sep!r}")
        value = sep.join(items)
    elif isinstance(v, bool):
        value = "yes" if v else "no"
    else:
        value = str(v)
    # A line break would start a new setting (PostInstallationScripts=... runs as root on
    # the build host): refuse rather than escape, mkosi has no escaping for it.
    if re.search(r"[\x00-\x1f\x7f]", value):
        raise ConfigError(f"mkosi setting {key}: {value!r} contains a line break or control character")
    return value


def _ini(sections: dict[str, dict[str, object]]) -> str:
    out = []
    for section, settings in sections.items():
        if not settings:
            continue
        out.append(f"[{section}]")
        for key, value in settings.items():
            out.append(f"{key}={_ini_value(key, value)}")
        out.append("")
    return "\n".join(out)


class TemplateRenderer:
    def __init__(self, context: dict):
        self.context = context

    def render_file(self, src: Path) -> str:
        env = jinja2.Environment(
            undefined=jinja2.StrictUndefined,
            keep_trailing_newline=True,
            trim_blocks=True,
            lstrip_blocks=True,
            loader=jinja2.FileSystemLoader(str(src.parent)),
        )
        try:
            return env.get_template(src.name).render(**self.context)
        except jinja2.TemplateSyntaxError as e:
            raise ConfigError(f"{src}:{e.lineno}: template syntax error: {e.message}") from None
        except jinja2.UndefinedError as e:
            raise ConfigError(f"{src}:{_template_line(e, src)}: {e.message}",
                              hint="the site model has no such value; check the variable name") from None
        except ConfigError:
            raise
        except Exception as e:  # a filter or attribute error inside the template
            raise ConfigError(f"{src}:{_template_line(e, src)}: {type(e).__name__}: {e}") from None


def _template_line(exc: BaseException, src: Path) -> str:
    line = "?"
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        if frame.f_code.co_filename == str(src):
            line = str(lineno)
    return line


def _copy_overlay(src: Path, dest: Path, renderer: TemplateRenderer) -> None:
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if rel.parts[0] == "README.md" or path.name == ".gitkeep":
            continue
        target = dest / rel
        if path.is_dir() and not path.is_symlink():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            target.symlink_to(os.readlink(path))
        elif path.suffix == ".j2":
            target = target.with_suffix("")
            target.write_text(renderer.render_file(path))
            shutil.copymode(path, target)
        else:
            shutil.copy2(path, target)


# mkosi versions this renderer writes for: 24.x (bookworm-backports) and 25.x (trixie).
# The host's check (appliance/host.py) and the refusal below read this one range.
MKOSI_VERSIONS = ((24, 0), (26, 0))

# Where mkosi 24 keeps the settings every image gets; used only when no mkosi can be
# imported (unit tests on a machine without it). With mkosi installed, its own table
# says: 25 moved the build-host settings into [Build] and renamed PackageManagerTrees.
_SECTIONS_24 = {
    "Distribution": "Distribution", "Release": "Distribution", "Architecture": "Distribution",
    "PackageManagerTrees": "Distribution", "CacheDirectory": "Output", "PackageCacheDirectory": "Output",
    "Incremental": "Host",
}


@functools.lru_cache(maxsize=1)
def _mkosi_table() -> dict[str, tuple[str, str]] | None:
    """The installed mkosi's table: every setting name (old names too) -> (section,
    current name)."""
    sys.path.append("/usr/lib/python3/dist-packages")
    try:
        from mkosi.config import SETTINGS  # type: ignore
    except Exception:
        return None
    finally:
        sys.path.remove("/usr/lib/python3/dist-packages")
    table = {}
    for st in SETTINGS:
        for name in getattr(st, "compat_names", ()):
            table[name] = (st.section, st.name)
    for st in SETTINGS:
        table[st.name] = (st.section, st.name)
    return table


def mkosi_sections(settings: dict[str, object], fallback: str = "Content") -> dict[str, dict[str, object]]:
    """Settings by name, grouped into the sections the installed mkosi reads them from
    (a setting in the wrong section is silently ignored by mkosi 24), under their current
    names."""
    table = _mkosi_table()
    out: dict[str, dict[str, object]] = {}
    for name, value in settings.items():
        if table is not None:
            if name not in table:
                raise ConfigError(f"mkosi has no setting {name}",
                                  hint=f"the builder supports mkosi {_versions()}; run ./build.py setup")
            section, name = table[name]
        else:
            section = _SECTIONS_24.get(name, fallback)
        out.setdefault(section, {})[name] = value
    return out


def _versions() -> str:
    (lo, _), (hi, _) = MKOSI_VERSIONS
    return " or ".join(f"{v}.x" for v in range(lo, hi))


def _check_mkosi_settings(layer: Profile, section: str, settings: dict) -> None:
    # mkosi silently ignores a setting in the wrong section; refuse it here instead.
    table = _mkosi_table()
    if table is None:
        return
    for key in settings:
        if key not in table:
            raise ConfigError(f"{layer.path}: mkosi.{section}.{key}: unknown mkosi setting")
        if table[key][0] != section:
            raise ConfigError(f"{layer.path}: mkosi.{section}.{key}: belongs in section [{table[key][0]}], not [{section}]")


def _source_name(layer: Profile) -> str:
    # Relative, so the same inputs hash the same in any checkout (CI's fresh clone too).
    if layer.path == Path():
        return "the site file"
    return f"{layer.path.parent.name}/{layer.path.name}"


def _repart(p: Partition) -> str:
    keys = {
        "Type": p.type, "Format": p.format, "Label": p.label,
        "SizeMinBytes": p.size_min, "SizeMaxBytes": p.size_max, "Minimize": p.minimize,
    }
    lines = ["[Partition]"] + [f"{k}={v}" for k, v in keys.items() if v is not None]
    lines += [f"CopyFiles={c}" for c in p.copy_files]
    return "\n".join(lines) + "\n"


def _postinst(commands: list[tuple[str, str]], checks: list[tuple[str, str]]) -> str:
    """Runs inside the image: each layer's build-time commands, then every layer's config
    checkers, failing loudly on the first error."""
    lines = [
        "#!/bin/bash",
        "# Generated: each layer's postinst commands, then every rendered daemon configuration",
        "# through the daemon's own checker.",
        "set -uo pipefail",
        # mkosi 25 runs scripts in a network namespace whose loopback is down; Postfix's
        # checker then finds no interface at all. (mkosi 24 leaves it up.)
        "ip link set lo up 2>/dev/null || true",
        "fail() { echo \"CONFIG CHECK FAILED ($1): $2\" >&2; echo \"$3\" >&2; exit 1; }",
    ]
    for layer, cmd in commands:
        q = cmd.replace("'", "'\\''")
        lines += [
            f"echo 'postinst ({layer}): {q}'",
            f"if ! out=$( {cmd} 2>&1 ); then echo 'POSTINST FAILED ({layer}): {q}' >&2; echo \"$out\" >&2; exit 1; fi",
        ]
    for layer, cmd in checks:
        q = cmd.replace("'", "'\\''")
        lines += [
            f"echo 'config check ({layer}): {q}'",
            f"if ! out=$( {cmd} 2>&1 ); then fail '{layer}' '{q}' \"$out\"; fi",
            # Postfix ignores a misspelt parameter with only a warning; treat it as an error.
            'if grep -qE "fatal:|unused parameter" <<<"$out"; then '
            f"fail '{layer}' '{q}' \"$out\"; fi",
        ]
    lines += ["echo 'config checks passed'", ""]
    return "\n".join(lines)


def render(
    plan: Plan,
    dest: Path,
    cache_dir: Path,
    package_cache: Path,
    initrd: Path | None = None,
) -> Path:
    """Write a complete mkosi configuration for the plan's image into `dest` (wiped first)."""
    site, role, layers = plan.site, plan.role, plan.layers
    _fresh_config_dir(dest)
    (dest / "mkosi.conf.d").mkdir(parents=True)

    for rel, text in SKELETON.items():
        (dest / "skeleton" / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / "skeleton" / rel).write_text(text)
    constants = dest / "trees" / "00-plan" / CONSTANTS_PATH
    constants.parent.mkdir(parents=True)
    constants.write_text(plan.constants())

    context = {
        "plan": plan,
        "site": site,
        "role": role,
        "layers": [l.name for l in layers],
        "ports": plan.ports,
        # Every role's ports on this site, for configuration that points at a peer.
        "peers": plan.peers,
    }
    renderer = TemplateRenderer(context)

    (dest / "mkosi.conf").write_text(_ini(mkosi_sections({
        **_common_settings(package_cache),
        "Format": "disk",
        "ImageId": f"mailcluster-{role}",
        "Output": role,
        "ManifestFormat": "json",
        "CompressOutput": "no",
        "CacheDirectory": str(cache_dir),
        # Not mkosi's default names (mkosi.repart, mkosi.postinst.chroot): mkosi picks
        # those up by name as well, and ran the script twice when both applied.
        "RepartDirectories": "repart",
        "Bootable": "yes",
        "Bootloader": "systemd-boot",
        "UnifiedKernelImages": "yes",
        "KernelCommandLine": CONSOLE_CMDLINE,
        "KernelModulesInitrdExclude": ".*",
        "KernelModulesInitrdInclude": INITRD_MODULES,
        "SkeletonTrees": "skeleton",
        "ExtraTrees": "trees/00-plan",
        "PostInstallationScripts": "postinst.chroot",
        "Incremental": "yes",
        # Built once per archive state by the builder (render_initrd); mkosi would
        # otherwise rebuild its default one in every build. The kernel's modules still
        # come from each image, in the modules initrd mkosi adds (the lists above).
        **({"Initrds": str(initrd)} if initrd else {}),
    })))

    for i, layer in enumerate(layers):
        idx = f"{(i + 1) * 10:02d}"
        trees = []
        for ov in layer.overlays:
            tree = dest / "trees" / f"{idx}-{layer.name}" / ov
            tree.mkdir(parents=True)
            _copy_overlay(plan.overlay_dir / ov, tree, renderer)
            trees.append(f"trees/{idx}-{layer.name}/{ov}")
        if layer.services.enable or layer.services.disable:
            preset = dest / "trees" / f"{idx}-{layer.name}" / "_preset"
            pfile = preset / "usr/lib/systemd/system-preset" / f"{idx}-mailcluster-{layer.name}.preset"
            pfile.parent.mkdir(parents=True)
            pfile.write_text(
                f"# Generated from profile {layer.name}\n"
                + "".join(f"enable {s}\n" for s in layer.services.enable)
                + "".join(f"disable {s}\n" for s in layer.services.disable)
            )
            trees.append(f"trees/{idx}-{layer.name}/_preset")
        sections: dict[str, dict[str, object]] = {"Content": {}}
        if layer.packages:
            sections["Content"]["Packages"] = layer.packages
        if trees:
            sections["Content"]["ExtraTrees"] = trees
        for sec, settings in layer.mkosi.items():
            _check_mkosi_settings(layer, sec, settings)
            sections.setdefault(sec, {}).update(settings)
        (dest / "mkosi.conf.d" / f"{idx}-{layer.name}.conf").write_text(
            f"# Generated from {_source_name(layer)}: {layer.description}\n"
            + _ini(sections)
        )

    repart = dest / "repart"
    repart.mkdir()
    for name, part in plan.partitions.items():
        (repart / f"{part.order:02d}-{name}.conf").write_text(_repart(part))

    script = dest / "postinst.chroot"
    script.write_text(_postinst(plan.postinst, plan.checks))
    script.chmod(0o755)

    (dest / "layers.json").write_text(json.dumps(
        {"role": role, "site": site.name, "layers": [l.name for l in layers]}, indent=2) + "\n")
    return dest


def _fresh_config_dir(dest: Path) -> None:
    """An empty mkosi directory with the apt sources every build uses."""
    if dest.exists():
        shutil.rmtree(dest)
    sources = dest / "pkgmngr/etc/apt/sources.list.d/mkosi.sources"
    sources.parent.mkdir(parents=True)
    sources.write_text(APT_SOURCES)


def _common_settings(package_cache: Path) -> dict[str, object]:
    """What the images and their shared initrd are built from, and the settings mkosi
    hands its default initrd from the image's own."""
    return {
        "Distribution": DISTRIBUTION[0], "Release": DISTRIBUTION[1], "Architecture": "x86-64",
        "PackageManagerTrees": "pkgmngr",
        "PackageCacheDirectory": str(package_cache),
        "Locale": "C.UTF-8",
        "Timezone": "UTC",
        "Keymap": "us",
    }


def render_initrd(dest: Path, package_cache: Path) -> Path:
    """The configuration of mkosi's own default initrd (its built-in mkosi-initrd), as
    mkosi would derive it from any role's: one initrd serves every role."""
    _fresh_config_dir(dest)
    (dest / "mkosi.conf").write_text(_ini({"Config": {"Include": "mkosi-initrd"}}) + _ini(mkosi_sections({
        **_common_settings(package_cache),
        "Output": "initrd",
    })))
    return dest


def tree_hash(root: Path, extra: bytes = b"") -> str:
    """A hash of every file's path, mode and content under `root` (symlinks by target)."""
    h = hashlib.sha256(extra)
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root)).encode()
        st = path.lstat()
        if path.is_symlink():
            h.update(b"L" + rel + b"\0" + os.readlink(path).encode() + b"\0")
        elif path.is_file():
            h.update(b"F" + rel + b"\0" + oct(st.st_mode & 0o7777).encode() + b"\0")
            h.update(hashlib.sha256(path.read_bytes()).digest())
        elif path.is_dir():
            h.update(b"D" + rel + b"\0")
    return h.hexdigest()
