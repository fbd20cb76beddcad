"""The plan: one role's image for one site, resolved once.

Everything the builder, the CLI, the tests and the benchmarks need to know about an image
(its layers with the site's last, packages, services, partitions, every port and who may
reach it, the variant and where its image goes) is computed here from the profiles and
the site, and read from here. The images carry the part their scripts need as one shell
file (`constants()`, installed as /usr/lib/mailcluster/plan.sh), so no script writes a
port or a role name of its own.
"""
from __future__ import annotations

import functools
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import paths
from .profiles import MkosiValue, Partition, Port, Profile, ProfileSet, Services, member_set, resolved_partitions
from .site import Site

if TYPE_CHECKING:
    from .credentials import Secrets

# Where the images' scripts find the plan (members.sh sources it).
CONSTANTS_PATH = "usr/lib/mailcluster/plan.sh"
# The unit that installs a node's certificate: a role that enables it serves TLS.
TLS_SERVICE = "mailcluster-tls.service"


def site_layer(site: Site, layers: Sequence[Profile]) -> Profile:
    """The site file's image settings as the last layer of every role."""
    parts = resolved_partitions(list(layers))
    overrides = {}
    if "data" in parts:
        overrides["data"] = parts["data"].model_copy(update={"size_min": site.image.data_size})
    mk: dict[str, dict[str, MkosiValue]] = (
        {"Content": {"KernelCommandLine": site.image.kernel_command_line}} if site.image.kernel_command_line else {})
    return Profile(
        description=f"site {site.name}",
        packages=site.image.extra_packages,
        partitions=overrides,
        mkosi=mk,
        name="site",
    )


def variant_name(role: str, extra: Sequence[str]) -> str:
    return "-".join((role, *extra))


def role_ports(layers: Sequence[Profile], site: Site | None = None) -> dict[str, Port]:
    """Ports a composed role serves and who may connect: its layers' (a later layer wins),
    then what the site adds for the role (a frontend's submission ports; a filter's port
    25 when the filters are the MX; the mailstores' ports for relayed submission)."""
    ports: dict[str, Port] = {}
    for layer in layers:
        ports.update(layer.ports)
    if site is not None:
        role = next((l.name for l in layers if l.kind == "role"), "")
        ports.update(site.site_ports(role))
    return ports


@dataclass(frozen=True)
class Plan:
    site: Site
    role: str
    extra: tuple[str, ...]
    layers: tuple[Profile, ...]  # the role's chain, the extra layers, then the site's
    overlay_dir: Path
    # Every role the profiles define, with the ports it serves on this site: what the
    # firewall's member sets and the membership records accept, and where peers connect.
    peers: Mapping[str, Mapping[str, Port]]

    @classmethod
    def of(cls, profiles: ProfileSet, site: Site, role: str, extra: Sequence[str] = ()) -> "Plan":
        composed = profiles.compose(role, list(extra))
        peers = {r: role_ports(profiles.compose(r), site) for r in profiles.roles}
        return cls(site, role, tuple(extra), (*composed, site_layer(site, composed)), profiles.overlay_dir, peers)

    @property
    def variant(self) -> str:
        return variant_name(self.role, self.extra)

    def image(self, root: Path = paths.IMAGES) -> Path:
        """Where `./build.py build` puts this image (and `run`, `publish` find it)."""
        return root / self.site.name / f"{self.variant}.raw"

    @property
    def secrets(self) -> "Secrets":
        """The site's secrets (keys, passwords), where every command keeps them."""
        from .credentials import Secrets

        return Secrets.of(self.site)

    def manifest(self, root: Path = paths.IMAGES) -> Path:
        return root / self.site.name / f"{self.variant}.manifest.json"

    @property
    def roles(self) -> list[str]:
        return list(self.peers)

    @property
    def member_sets(self) -> dict[str, str]:
        """role -> the nftables set of its active members."""
        return {r: member_set(r) for r in self.roles}

    @property
    def packages(self) -> list[str]:
        return [p for l in self.layers for p in l.packages]

    @property
    def services(self) -> Services:
        return Services(enable=[s for l in self.layers for s in l.services.enable],
                        disable=[s for l in self.layers for s in l.services.disable])

    @functools.cached_property
    def ports(self) -> dict[str, Port]:
        return role_ports(self.layers, self.site)

    def port_numbers(self, source: str | None = None) -> dict[str, int]:
        """name -> port number, optionally only the ports open to `source`."""
        return {name: p.port for name, p in self.ports.items() if source is None or source in p.allow}

    @property
    def forwarded_ports(self) -> list[int]:
        """Every port the role serves, once each: what a VM forwards from the host."""
        return sorted(set(self.port_numbers().values()))

    @functools.cached_property
    def partitions(self) -> dict[str, Partition]:
        return resolved_partitions(list(self.layers))

    @property
    def postinst(self) -> list[tuple[str, str]]:
        return [(l.name, c) for l in self.layers for c in l.postinst]

    @property
    def checks(self) -> list[tuple[str, str]]:
        return [(l.name, c) for l in self.layers for c in l.checks]

    @functools.cached_property
    def tls(self) -> str | None:
        """Which certificate this role's nodes serve (None: the role serves no TLS)."""
        if TLS_SERVICE not in self.services.enable:
            return None
        if self.role == "frontend":
            # Mail's TLS passes through to the filters and mailstores: a frontend's own
            # certificate is only the MTA-STS policy's (appliance/acme.py).
            if self.site.tls.acme is None or self.site.tls.mta_sts is None:
                return None
            return (f"ACME, for the MTA-STS policy's names only (mta-sts.{self.site.domain}, ...): each node "
                    f"gets its own from {self.site.tls.acme.directory}; mail's TLS passes through")
        cert = self.site.site_certificate()
        if cert is not None:
            return cert.describe()
        if self.site.tls.acme is not None:
            return (f"ACME: each node gets its own from {self.site.tls.acme.directory} and renews it "
                    "(self-signed until the CA has answered)")
        return ("self-signed: each node makes its own at first boot (the site file's tls.certificate "
                "and tls.key give the nodes a CA's, tls.acme an ACME CA's)")

    def describe(self) -> dict[str, Any]:
        """What `./build.py show` prints (and `--json` gives)."""
        return {
            "role": self.role,
            "site": self.site.name,
            "variant": self.variant,
            "image": str(self.image()),
            "secrets": str(self.secrets.root),
            "layers": [l.name for l in self.layers],
            "packages": self.packages,
            "services": self.services.model_dump(),
            "ports": {k: p.model_dump() for k, p in self.ports.items()},
            "partitions": {k: v.model_dump(exclude_none=True) for k, v in self.partitions.items()},
            "checks": [c for _, c in self.checks],
            **({"tls": self.tls} if self.tls else {}),
            "constants": self.constants(),
        }

    def constants(self) -> str:
        """The plan as the images' scripts read it: a bash file they source."""
        q = shlex.quote
        lines = [
            f"# Generated by the builder from the plan of role {self.role} for site {self.site.name}",
            "# (profiles/*.yaml and the site file); appliance/plan.py says what each name means.",
            "# shellcheck shell=bash disable=SC2034",
            f"MC_ROLE={q(self.role)}",
            f"MC_ROLES=({' '.join(q(r) for r in self.roles)})",
            "# The nftables set that holds each role's active members.",
            "declare -gA MC_SET=(" + " ".join(f"[{r}]={q(s)}" for r, s in self.member_sets.items()) + ")",
            "# MC_PORT_<ROLE>_<NAME>: the port each role serves under that name on this site.",
        ]
        for r, ports in self.peers.items():
            for name, p in sorted(ports.items()):
                lines.append(f"MC_PORT_{_shell_name(r)}_{_shell_name(name)}={p.port}")
        return "\n".join(lines) + "\n"


def _shell_name(name: str) -> str:
    return name.upper().replace("-", "_")
