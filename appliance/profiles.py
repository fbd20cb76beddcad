"""Profiles: one YAML document per layer (base, hardened, roles, test).

A profile names its parents, packages, overlays, services, partitions, the ports its
role serves and the checkers that validate its rendered configuration. Composition only
orders the layers; merging is left to mkosi (one drop-in per layer: lists append,
later scalars win) and systemd (one preset file per layer).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from . import paths
from .errors import ConfigError

MkosiValue = str | list[str]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Services(_Model):
    enable: list[str] = []
    disable: list[str] = []


# Who may connect to a port: the world, the site's admin network, the whole cluster
# network (nodes that are joining included), or the active members of one role (the
# role's member set, `member_set`). ProfileSet.load checks each name.
NETWORK_SOURCES = ("world", "admin", "cluster")


def member_set(role: str) -> str:
    """The name by which ports admit a role's active members (and of its nftables set)."""
    return f"{role}s"


class Port(_Model):
    """A TCP port a role serves, and who may connect to it (nftables enforces it)."""

    port: int = Field(ge=1, le=65535)
    allow: list[str] = Field(default=["world"], min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _bare_number(cls, value: object) -> object:
        return {"port": value} if isinstance(value, int) else value  # `smtp: 25`: open to the world


class Partition(_Model):
    """A systemd-repart definition; a later layer replaces a partition of the same name."""

    order: int = Field(ge=0, le=99, description="sorts the partition table")
    type: str
    format: str | None = None
    label: str | None = None
    size_min: Annotated[str, StringConstraints(pattern=r"^[0-9]+[KMGT]$")] | None = None
    size_max: Annotated[str, StringConstraints(pattern=r"^[0-9]+[KMGT]$")] | None = None
    copy_files: list[str] = []
    minimize: Literal["off", "best", "guess"] | None = None


class Profile(_Model):
    description: str
    kind: Literal["layer", "role"] = "layer"
    parents: list[str] = []
    packages: list[str] = []
    overlays: list[str] = []
    services: Services = Services()
    partitions: dict[str, Partition] = {}
    ports: dict[str, Port] = Field(
        default={}, description="service name -> TCP port the role serves: a number (open to the world) "
                                "or {port: N, allow: [admin, cluster, or a role's members: frontends, filters, ...]}")
    postinst: list[str] = Field(default=[], description="commands run inside the image at build time, "
                                                        "after the overlays and before every layer's checks")
    checks: list[str] = Field(default=[], description="commands run inside the image at build time")
    mkosi: dict[str, dict[str, MkosiValue]] = Field(default={}, description="raw mkosi settings by section")

    # Filled in by the loader, not the YAML.
    name: str = ""
    path: Path = Path()


def _load_one(path: Path) -> Profile:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for reserved in ("name", "path"):
        if reserved in data:
            raise ConfigError(f"{path}: {reserved}: unknown key (a profile's name is its file name)")
    try:
        prof = Profile.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            what = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"{path}: {loc}: {what}")
        raise ConfigError("\n".join(lines)) from None
    return prof.model_copy(update={"name": path.stem, "path": path})


@dataclass(frozen=True)
class ProfileSet:
    """Every profile in a directory, with the overlay directory they refer to."""

    profiles: dict[str, Profile]
    overlay_dir: Path

    @classmethod
    def load(cls, profile_dir: Path = paths.PROFILES, overlay_dir: Path = paths.OVERLAYS) -> "ProfileSet":
        files = sorted(profile_dir.glob("*.yaml"))
        if not files:
            raise ConfigError(f"{profile_dir}: no profiles (*.yaml) found")
        profiles = {f.stem: _load_one(f) for f in files}
        ps = cls(profiles, overlay_dir)
        for p in profiles.values():
            for parent in p.parents:
                if parent not in profiles:
                    raise ConfigError(f"{p.path}: parents: unknown profile {parent!r}", hint=f"profiles: {', '.join(profiles)}")
            for ov in p.overlays:
                if not (overlay_dir / ov).is_dir():
                    raise ConfigError(f"{p.path}: overlays: no overlay directory {overlay_dir / ov}")
        for name in profiles:
            ps.chain(name)  # reject cycles up front
        sources = (*NETWORK_SOURCES, *(member_set(r) for r in ps.roles))
        for p in profiles.values():
            for port_name, port in p.ports.items():
                for src in port.allow:
                    if src not in sources:
                        raise ConfigError(f"{p.path}: ports.{port_name}.allow: unknown source {src!r}",
                                          hint=f"one of: {', '.join(sources)}")
        return ps

    @property
    def roles(self) -> list[str]:
        return sorted(n for n, p in self.profiles.items() if p.kind == "role")

    def get(self, name: str) -> Profile:
        try:
            return self.profiles[name]
        except KeyError:
            raise ConfigError(f"unknown profile {name!r}", hint=f"roles: {', '.join(self.roles)}") from None

    def chain(self, name: str, _stack: tuple[str, ...] = ()) -> list[Profile]:
        """The layers of `name`, parents first, each once (depth-first, declaration order)."""
        if name in _stack:
            raise ConfigError(f"{self.get(name).path}: parents: cycle {' -> '.join((*_stack, name))}")
        prof = self.get(name)
        out: list[Profile] = []
        for parent in prof.parents:
            for p in self.chain(parent, (*_stack, name)):
                if p.name not in {q.name for q in out}:
                    out.append(p)
        out.append(prof)
        return out

    def compose(self, role: str, extra: Sequence[str] = ()) -> list[Profile]:
        """Layers for an image: the role's chain, then any extra layers (e.g. `test`)."""
        if self.get(role).kind != "role":
            raise ConfigError(f"{role!r} is a layer, not a role", hint=f"roles: {', '.join(self.roles)}")
        layers = self.chain(role)
        for name in extra:
            for p in self.chain(name):
                if p.name not in {q.name for q in layers}:
                    layers.append(p)
        return layers


def resolved_partitions(layers: list[Profile]) -> dict[str, Partition]:
    parts: dict[str, Partition] = {}
    for layer in layers:
        parts.update(layer.partitions)
    return dict(sorted(parts.items(), key=lambda kv: kv[1].order))
