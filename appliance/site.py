"""The site model: one YAML file describes one cluster.

Parsed into frozen pydantic models; every error names the file, the key path and what
was expected. Unknown keys are errors, never silently ignored.
"""
from __future__ import annotations

import ipaddress
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from .errors import ConfigError
from .profiles import Port, member_set

if TYPE_CHECKING:
    from .tls import SiteCertificate

# The account a backup node keeps each primary's snapshots under is this prefix and the
# primary's name (overlays/60-mailstore: backup-pair makes it); systemd allows user names
# of at most 31 characters.
BACKUP_ACCOUNT = "mcb-"
USER_NAME_MAX = 31

Hostname = Annotated[
    str, StringConstraints(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
]
DomainName = Annotated[
    str,
    StringConstraints(
        max_length=253, pattern=r"^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$"
    ),
]
# Bounded digit counts: these reach bash arithmetic and daemon settings, where a huge
# number wraps or overflows.
Size = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,6}[KMGT]$")]
Duration = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,5}[smhdw]$")]
# Debian policy 5.6.1: lower case letters, digits, + - . ; two characters at least.
PackageName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9+.-]+$", max_length=100)]
# One kernel parameter (name or name=value): printable ASCII without spaces or quotes,
# which would split or join parameters in the UKI's command line.
KernelParameter = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.,:/=+@%-]+$", max_length=256)]

# Dovecot passdb hashes, one grammar per accepted scheme. Matched whole: the value is
# written into a colon-separated passwd-file, where a ':' or a newline would add fields
# or users.
_B64 = r"[A-Za-z0-9+/]+"
_CRYPT64 = r"[./0-9A-Za-z]"
PASSWORD_HASHES = {
    "SHA512-CRYPT": rf"\$6\$(rounds=[0-9]{{4,9}}\$)?{_CRYPT64}{{1,16}}\${_CRYPT64}{{86}}",
    "BLF-CRYPT": rf"\$2[aby]\$[0-9]{{2}}\${_CRYPT64}{{53}}",
    "ARGON2ID": rf"\$argon2id\$v=19\$m=[0-9]{{1,8}},t=[0-9]{{1,4}},p=[0-9]{{1,3}}\${_B64}\${_B64}",
    "ARGON2I": rf"\$argon2i\$v=19\$m=[0-9]{{1,8}},t=[0-9]{{1,4}},p=[0-9]{{1,3}}\${_B64}\${_B64}",
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Network(_Model):
    cluster: ipaddress.IPv4Network = Field(
        description="private network the nodes talk on (CIDR)"
    )
    admin: ipaddress.IPv4Network | None = Field(
        default=None,
        description="network allowed to reach SSH and admin endpoints; default: cluster",
    )
    gateway: ipaddress.IPv4Address | None = None
    resolvers: list[ipaddress.IPv4Address] = Field(
        default=[], max_length=3,
        description="DNS resolvers of every node (/etc/resolv.conf): the filters look up where mail goes, "
                    "NTP and ACME names need them; none: the nodes resolve nothing")

    @property
    def admin_network(self) -> ipaddress.IPv4Network:
        return self.admin or self.cluster


class Node(_Model):
    name: Hostname
    role: str = Field(description="a role profile: frontend, filter or mailstore")
    address: ipaddress.IPv4Address
    mac: Annotated[
        str, StringConstraints(pattern=r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
    ] | None = Field(default=None, description="MAC of the cluster NIC (bare metal)")
    public_address: ipaddress.IPv4Address | None = Field(
        default=None, description="address the Internet reaches this node at (frontends, MX filters); for DNS records")


MailAddress = Annotated[str, StringConstraints(pattern=r"^[a-z0-9._+-]+@[a-z0-9.-]+$", max_length=254)]


class User(_Model):
    address: MailAddress
    quota: Size = "1G"
    # A crypt(3)-style hash ({ARGON2ID}/{SHA512-CRYPT}); never a plaintext password.
    # Missing: the builder generates a password into the site's secrets directory.
    password_hash: str | None = None
    mailstore: Hostname | None = Field(
        default=None, description="the mailstore holding this mailbox; default: the first mailstore that is not a backup")
    openpgp: Path | None = Field(
        default=None, description="the user's OpenPGP certificate (armored, public; relative to the site file): "
                                  "the mailstore stores every message to the user encrypted to it (PGP/MIME)")

    @field_validator("password_hash")
    @classmethod
    def _strong_hash(cls, value: str | None) -> str | None:
        if value is None:
            return value
        scheme = re.match(r"\{([A-Z0-9-]+)\}", value)
        grammar = PASSWORD_HASHES.get(scheme.group(1)) if scheme else None
        if scheme is None or grammar is None or not re.fullmatch(grammar, value[scheme.end():]):
            raise ValueError(
                "expected a strong hash such as '{ARGON2ID}$argon2id$...' or "
                "'{SHA512-CRYPT}$6$...' (plaintext and weak schemes are refused)"
            )
        return value


class BackupPair(_Model):
    primary: Hostname
    backup: Hostname
    schedule: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9 ,.:*/~+-]+$", max_length=128)] = Field(
        default="hourly", description="systemd OnCalendar= expression")

    @field_validator("schedule")
    @classmethod
    def _calendar(cls, value: str) -> str:
        check_calendar(value)
        return value


def check_calendar(expression: str) -> None:
    """systemd's own parser decides what OnCalendar= accepts: a value it refuses would
    leave the backup timer without a schedule, and no backup would ever run."""
    analyze = shutil.which("systemd-analyze", path="/usr/bin:/bin:/usr/sbin:/sbin")
    if analyze is None:
        raise ValueError("cannot check the calendar expression: systemd-analyze is missing (run ./build.py setup)")
    r = subprocess.run([analyze, "calendar", "--", expression], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        why = (r.stderr.strip().splitlines() or ["refused"])[-1]
        raise ValueError(f"{expression!r} is not a systemd calendar expression ({why}); "
                         "examples: hourly, daily, *-*-* 02:30:00, Mon..Fri 22:00")


class Retention(_Model):
    """Which backup snapshots the backup node keeps: the newest `recent` ones, and the
    newest of each of the last `daily` days and `monthly` months."""
    recent: int = Field(default=24, ge=1, le=10_000)
    daily: int = Field(default=30, ge=1, le=36_600)
    monthly: int = Field(default=120, ge=0, le=1_200)


class Filter(_Model):
    engine: str = Field(default="rspamd", description="the spam engine; rspamd is the only one built so far")
    # Finite and positive: NaN or a negative score would reject every message.
    reject_score: float = Field(default=15.0, gt=0, le=1000, allow_inf_nan=False)
    queue_lifetime: Duration = "5d"

    @field_validator("engine")
    @classmethod
    def _built_engine(cls, value: str) -> str:
        if value != "rspamd":
            raise ValueError(f"engine {value!r} is not built into the filter image yet; use 'rspamd' "
                             "(a setting the images would ignore is refused, not accepted)")
        return value

    @field_validator("queue_lifetime")
    @classmethod
    def _at_least_five_days(cls, value: str) -> str:
        seconds = int(value[:-1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[value[-1]]
        if seconds < 5 * 86400:
            raise ValueError("expected at least 5d: shorter lifetimes bounce mail during outages")
        return value


class RateLimit(_Model):
    connections: int = Field(default=20, ge=1, le=100_000)
    period: Duration = "10s"


# Ports a frontend can serve. 25 goes to the filters; submission (587, STARTTLS) and
# submissions (465, implicit TLS) go to the mailstores, where users authenticate.
FRONTEND_PORTS = {25: "smtp", 465: "submissions", 587: "submission"}
# Where a mailstore takes submission relayed by a frontend: its own port, because these
# connections start with HAProxy's PROXY header and direct ones do not.
PROXIED_SUBMISSION = {465: 10465, 587: 10587}


class Frontend(_Model):
    ports: list[Literal[25, 465, 587]] = Field(default=[25], description="25 (to the filters), 465 and 587 (to the mailstores)")
    rate_limit: RateLimit = RateLimit()

    @field_validator("ports")
    @classmethod
    def _unique(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError(f"a port is listed twice in {value}")
        return sorted(value)


# An ACME directory: https only, and nothing a shell or a config line could misread.
AcmeUrl = Annotated[str, StringConstraints(pattern=r"^https://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~%/-]*)?$",
                                           max_length=300)]


class DnsUpdate(_Model):
    """DNS-01 instead of HTTP-01: each node that orders puts the CA's challenge into the
    site's DNS itself, as an RFC 2136 update signed with a TSIG key, and removes it after."""
    server: ipaddress.IPv4Address = Field(description="the primary DNS server of the site's zones, which takes the updates")
    port: int = Field(default=53, ge=1, le=65535)
    key: Path = Field(description="the TSIG key as tsig-keygen or knotc writes it (key \"NAME\" { algorithm "
                                  "hmac-sha256; secret \"...\"; };), mode 0600; the server lets it update "
                                  "only _acme-challenge names")


class Acme(_Model):
    """Certificates from an ACME CA (RFC 8555), which each node that serves TLS obtains
    and renews itself (appliance/acme.py)."""
    directory: AcmeUrl = Field(description="the CA's ACME directory URL, e.g. "
                                           "https://acme-v02.api.letsencrypt.org/directory")
    contact: MailAddress = Field(description="the account's contact: where the CA writes about expiry and problems")
    ca: Path | None = Field(default=None, description="PEM: the CA that signed the ACME server's own HTTPS "
                                                      "certificate, when it is not a public one (a private ACME CA)")
    dns_update: DnsUpdate | None = Field(default=None, description="answer the CA with DNS-01 through this DNS "
                                                                   "server (RFC 2136) instead of HTTP-01 on port 80")


class MtaSts(_Model):
    """MTA-STS (RFC 8461) for the site's domains: senders that support it deliver only
    over TLS verified for the MX names. The frontends serve the policy at
    https://mta-sts.DOMAIN/.well-known/mta-sts.txt with a certificate of their own from
    the site's ACME CA; ./build.py dns prints the _mta-sts and mta-sts records."""
    mode: Literal["testing", "enforce", "none"] = Field(
        default="testing", description="testing: senders only report (TLS-RPT); enforce: they refuse an "
                                       "unverified MX; none: withdraws a published policy")
    max_age: int = Field(default=604800, ge=86400, le=31557600,
                         description="seconds senders keep the policy (1 day to 1 year; RFC 8461 recommends weeks)")


class Tls(_Model):
    """The site's own certificate, for every node that serves TLS (SMTP, submission,
    IMAP), or ACME. Paths relative to the site file. Neither: each node makes its own
    self-signed certificate at first boot."""
    certificate: Path | None = Field(default=None, description="PEM chain, the nodes' certificate first")
    key: Path | None = Field(default=None, description="its unencrypted PEM private key (mode 0600)")
    acme: Acme | None = Field(default=None, description="instead of a certificate: each node gets its own "
                                                        "from this ACME CA (HTTP-01 on port 80) and renews it")
    reports: MailAddress | None = Field(
        default=None, description="where senders report TLS failures (TLS-RPT, RFC 8460: ./build.py dns)")
    mta_sts: MtaSts | None = Field(default=None, description="publish an MTA-STS policy (needs tls.acme and "
                                                             "a frontend, which serves it)")

    @model_validator(mode="after")
    def _both(self) -> "Tls":
        if (self.certificate is None) != (self.key is None):
            raise ValueError("tls.certificate and tls.key go together: give both, or neither "
                             "(each node then makes its own self-signed certificate)")
        if self.certificate is not None and self.acme is not None:
            raise ValueError("tls.certificate and tls.acme exclude each other: give the site's certificate, "
                             "or let the nodes get theirs from an ACME CA")
        if self.mta_sts is not None and self.acme is None:
            # The policy's HTTPS needs a certificate for mta-sts.DOMAIN on the frontends,
            # which never hold the site's own key (they pass mail's TLS through).
            raise ValueError("tls.mta_sts needs tls.acme: the frontends serve the policy with a certificate "
                             "for mta-sts.DOMAIN from the site's ACME CA (they never get tls.key): add tls.acme, "
                             "or leave tls.mta_sts out")
        return self


class Alias(_Model):
    """An address of a site domain that delivers to others: users of the site, or
    addresses elsewhere (forwarded through the filters)."""
    address: MailAddress
    to: list[MailAddress] = Field(min_length=1, max_length=100)


class CatchAll(_Model):
    """Mail to any address of `domain` that is no user or alias goes to `to`."""
    domain: DomainName
    to: list[MailAddress] = Field(min_length=1, max_length=100)


# Every domain has these (RFC 5321 postmaster, RFC 2142 abuse); the site's `postmaster`
# receives them unless the site makes one a user or an alias of its own.
REQUIRED_ALIASES = ("postmaster", "abuse")


class Dmarc(_Model):
    """What receivers do with mail that claims a site domain but fails SPF and DKIM
    (published by ./build.py dns as each domain's _dmarc record)."""
    policy: Literal["none", "quarantine", "reject"] = Field(
        default="none", description="none: only report (start here, read the reports, then tighten)")
    reports: MailAddress | None = Field(default=None, description="where receivers send aggregate reports (rua)")


class Wkd(_Model):
    """A Web Key Directory of the users' OpenPGP certificates (users[].openpgp), so that
    correspondents' clients find each user's key by address. The frontends serve it at
    https://openpgpkey.DOMAIN/.well-known/openpgpkey/DOMAIN/ (WKD's advanced method) with a
    certificate of their own from the site's ACME CA; ./build.py dns prints the records."""
    direct: bool = Field(default=False, description="also WKD's direct method, https://DOMAIN/.well-known/openpgpkey/: "
                                                    "only where DOMAIN's own A record may point at the frontends "
                                                    "(usually it is the web site's; ./build.py dns prints it)")


class Time(_Model):
    servers: list[DomainName | ipaddress.IPv4Address] = Field(
        default=[], max_length=16, description="NTP servers for every node; default: Debian's pool")


class Image(_Model):
    data_size: Size = Field(default="2G", description="mailstore data partition, grown to the disk at first boot")
    extra_packages: list[PackageName] = Field(default=[], max_length=200)
    kernel_command_line: list[KernelParameter] = Field(default=[], max_length=64)


class Site(_Model):
    name: Hostname
    domain: DomainName
    domains: list[DomainName] = []
    network: Network
    nodes: list[Node] = Field(min_length=1)
    users: list[User] = []
    aliases: list[Alias] = []
    catch_all: list[CatchAll] = Field(default=[], description="per domain; off unless listed")
    postmaster: MailAddress | None = Field(
        default=None, description="who gets postmaster@ and abuse@ of every domain; default: the first user")
    backups: list[BackupPair] = []
    filter: Filter = Filter()
    frontend: Frontend = Frontend()
    tls: Tls = Tls()
    dmarc: Dmarc = Dmarc()
    retention: Retention = Retention()
    time: Time = Time()
    image: Image = Image()
    wkd: Wkd | None = Field(default=None, description="publish users' OpenPGP certificates in a Web Key Directory "
                                                       "(needs tls.acme and a frontend)")

    def acme_ca(self) -> str | None:
        """tls.acme.ca, read and checked now (PEM certificates only)."""
        from . import tls

        if self.tls.acme is None or self.tls.acme.ca is None:
            return None
        return tls.load_certificates(self.tls.acme.ca)

    def acme_tsig_key(self) -> str | None:
        """tls.acme.dns_update.key, read and checked now (one TSIG key, rewritten in the
        form nsupdate reads)."""
        from . import acme

        if self.tls.acme is None or self.tls.acme.dns_update is None:
            return None
        return acme.load_tsig_key(self.tls.acme.dns_update.key)

    def site_certificate(self) -> "SiteCertificate | None":
        """The site's certificate and key, read and checked now (None: self-signed nodes)."""
        from . import tls

        if self.tls.certificate is None or self.tls.key is None:
            return None
        return tls.load(self.tls.certificate, self.tls.key)

    @property
    def mail_domains(self) -> list[str]:
        return [self.domain, *[d for d in self.domains if d != self.domain]]

    def nodes_with_role(self, role: str) -> list[Node]:
        return [n for n in self.nodes if n.role == role]

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise ConfigError(
            f"no node named {name!r} in site {self.name!r}",
            hint="known nodes: " + ", ".join(n.name for n in self.nodes),
        )

    def site_ports(self, role: str) -> dict[str, Port]:
        """Ports this site adds for a role on top of its profile's: a frontend's public
        ports, a filter's port 25 when there is no frontend (the filters are the MX), and
        the mailstores' ports for the submission the frontends relay."""
        frontends = bool(self.nodes_with_role("frontend"))
        if role == "frontend" and frontends:
            return {FRONTEND_PORTS[p]: Port(port=p) for p in self.frontend.ports}
        if role == "filter" and not frontends:
            # The MX: its name validates ACME challenges here.
            return {"smtp": Port(port=25), "acme-challenge": Port(port=80)}
        if role == "mailstore":
            return {f"{FRONTEND_PORTS[p]}-proxied": Port(port=local, allow=[member_set("frontend")])
                    for p, local in self.proxied_submission_ports().items()}
        return {}

    def proxied_submission_ports(self) -> dict[int, int]:
        """Frontend port -> the mailstores' port for it, for the submission ports the
        frontends relay."""
        if not self.nodes_with_role("frontend"):
            return {}
        return {p: PROXIED_SUBMISSION[p] for p in self.frontend.ports if p in PROXIED_SUBMISSION}

    @property
    def all_aliases(self) -> dict[str, list[str]]:
        """Every alias address -> its targets: the site's, then postmaster@ and abuse@ of
        each domain that does not have its own (to `postmaster`, or the first user)."""
        out = {a.address: list(a.to) for a in self.aliases}
        taken = set(out) | {u.address for u in self.users}
        receiver = self.postmaster or (self.users[0].address if self.users else None)
        if receiver is not None:
            for domain in self.mail_domains:
                for local in REQUIRED_ALIASES:
                    if f"{local}@{domain}" not in taken:
                        out[f"{local}@{domain}"] = [receiver]
        return out

    @property
    def active_mailstores(self) -> list[Node]:
        """Mailstores that hold mailboxes: every mailstore that is not some pair's backup."""
        backups = {p.backup for p in self.backups}
        return [n for n in self.nodes_with_role("mailstore") if n.name not in backups]

    def mailstore_of(self, user: User) -> str:
        if user.mailstore:
            return user.mailstore
        active = self.active_mailstores
        if not active:
            raise ConfigError(f"site {self.name!r} has users but no mailstore to hold their mail",
                              hint="add a node with role: mailstore")
        return active[0].name

    @property
    def roles(self) -> list[str]:
        return sorted({n.role for n in self.nodes})

    @model_validator(mode="after")
    def _consistent(self) -> "Site":
        problems: list[tuple[str, str]] = []
        seen: dict[str, int] = {}
        addrs: dict[ipaddress.IPv4Address, str] = {}
        net = self.network.cluster
        if self.network.gateway is not None and self.network.gateway not in net:
            problems.append(("network.gateway", f"{self.network.gateway} is outside network.cluster {net}"))
        if self.network.admin is not None and self.network.admin.prefixlen < 8:
            problems.append(("network.admin", f"{self.network.admin} would admit most of the Internet to SSH and "
                                              "the admin endpoints; name the operators' own network"))
        for i, n in enumerate(self.nodes):
            if net.prefixlen < 31 and n.address in (net.network_address, net.broadcast_address):
                problems.append((f"nodes[{i}].address", f"{n.address} is the {'network' if n.address == net.network_address else 'broadcast'} "
                                                        f"address of {net}, not a host address"))
            if n.name in seen:
                problems.append((f"nodes[{i}].name", f"duplicate node name {n.name!r} (also nodes[{seen[n.name]}])"))
            seen.setdefault(n.name, i)
            if n.address not in self.network.cluster:
                problems.append((f"nodes[{i}].address", f"{n.address} is outside network.cluster {self.network.cluster}"))
            if n.address in addrs:
                problems.append((f"nodes[{i}].address", f"{n.address} is already used by {addrs[n.address]!r}"))
            addrs.setdefault(n.address, n.name)
        by_name = {n.name: n for n in self.nodes}
        primaries: dict[str, int] = {}
        for i, pair in enumerate(self.backups):
            if pair.primary in primaries:
                problems.append((f"backups[{i}].primary", f"{pair.primary!r} is already the primary of "
                                                          f"backups[{primaries[pair.primary]}]; a mailstore has one backup"))
            primaries.setdefault(pair.primary, i)
            for key in ("primary", "backup"):
                name = getattr(pair, key)
                node = by_name.get(name)
                if node is None:
                    problems.append((f"backups[{i}].{key}", f"unknown node {name!r}"))
                elif node.role != "mailstore":
                    problems.append((f"backups[{i}].{key}", f"{name!r} has role {node.role!r}; expected a mailstore"))
            if pair.primary == pair.backup:
                problems.append((f"backups[{i}]", "a mailstore cannot back itself up"))
            if len(BACKUP_ACCOUNT + pair.primary) > USER_NAME_MAX:
                problems.append((f"backups[{i}].primary", f"{pair.primary!r} has {len(pair.primary)} characters; the "
                                 f"backup keeps each primary's snapshots under an account named {BACKUP_ACCOUNT}PRIMARY, "
                                 f"which allows a primary name of at most {USER_NAME_MAX - len(BACKUP_ACCOUNT)}"))
        for i, u in enumerate(self.users):
            domain = u.address.split("@", 1)[1]
            if domain not in self.mail_domains:
                problems.append((f"users[{i}].address", f"domain {domain!r} is not one of the site's domains {self.mail_domains}"))
            if u.mailstore is not None:
                node = by_name.get(u.mailstore)
                if node is None or node.role != "mailstore":
                    problems.append((f"users[{i}].mailstore", f"{u.mailstore!r} is not a mailstore of this site"))
                elif u.mailstore in {p.backup for p in self.backups}:
                    problems.append((f"users[{i}].mailstore", f"{u.mailstore!r} is a backup mailstore; mailboxes live on primaries"))
        if len({u.address for u in self.users}) != len(self.users):
            problems.append(("users", "duplicate user address"))
        users, seen_aliases = {u.address for u in self.users}, set()
        known = users | {a.address for a in self.aliases}

        def check_targets(where: str, targets: list[str]) -> None:
            # A target on a site domain must exist here; elsewhere, it is forwarded.
            for j, target in enumerate(targets):
                if target.split("@", 1)[1] in self.mail_domains and target not in known:
                    problems.append((f"{where}.to[{j}]", f"{target} is no user or alias of this site"))

        for i, a in enumerate(self.aliases):
            domain = a.address.split("@", 1)[1]
            if domain not in self.mail_domains:
                problems.append((f"aliases[{i}].address", f"domain {domain!r} is not one of the site's domains {self.mail_domains}"))
            if a.address in users:
                problems.append((f"aliases[{i}].address", f"{a.address} is a user; an address is a user or an alias"))
            if a.address in seen_aliases:
                problems.append((f"aliases[{i}].address", f"{a.address} is listed twice"))
            seen_aliases.add(a.address)
            check_targets(f"aliases[{i}]", a.to)
        seen_domains: set[str] = set()
        for i, c in enumerate(self.catch_all):
            if c.domain not in self.mail_domains:
                problems.append((f"catch_all[{i}].domain", f"{c.domain!r} is not one of the site's domains {self.mail_domains}"))
            if c.domain in seen_domains:
                problems.append((f"catch_all[{i}].domain", f"{c.domain} has a catch-all already"))
            seen_domains.add(c.domain)
            check_targets(f"catch_all[{i}]", c.to)
        if self.tls.mta_sts is not None and not self.nodes_with_role("frontend"):
            problems.append(("tls.mta_sts", "the frontends serve the MTA-STS policy, and this site has none: "
                                            "add a frontend, or remove tls.mta_sts"))
        if self.wkd is not None:
            if self.tls.acme is None:
                problems.append(("wkd", "the frontends serve the Web Key Directory over HTTPS with a certificate for "
                                        "openpgpkey.DOMAIN from the site's ACME CA: add tls.acme, or remove wkd"))
            if not self.nodes_with_role("frontend"):
                problems.append(("wkd", "the frontends serve the Web Key Directory, and this site has none: "
                                        "add a frontend, or remove wkd"))
        if self.postmaster is None and not self.users and self.aliases:
            problems.append(("postmaster", "nobody receives postmaster@ and abuse@: name a postmaster or add a user"))
        if problems:
            raise ValueError("\n".join(f"{k}: {v}" for k, v in problems))
        return self


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _describe(err: ErrorDetails) -> str:
    kind, msg = err["type"], err["msg"]
    value = err.get("input")
    if kind == "extra_forbidden":
        return "unknown key (remove it or check its spelling)"
    if kind == "missing":
        return "required key is missing"
    if kind.startswith("string_pattern"):
        return f"expected {msg.split('match pattern')[0].strip() or 'a value'} of the right form, got {value!r}"
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    return f"{msg} (got {value!r})" if not isinstance(value, (dict, list)) else msg


def parse_site(data: object, source: Path | str, known_roles: list[str]) -> Site:
    """Validate parsed YAML; raise ConfigError naming `source` and every bad key path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        site = Site.model_validate(data)
    except ValidationError as e:
        lines: list[str] = []
        for err in e.errors():
            if err["type"] == "value_error" and not err["loc"]:
                # model-level consistency checks carry their own key paths
                lines.extend(f"{source}: {p}" for p in err["msg"].removeprefix("Value error, ").splitlines())
            else:
                lines.append(f"{source}: {_loc(err['loc'])}: {_describe(err)}")
        raise ConfigError("\n".join(lines), hint="see sites/example.yaml for a valid site file") from None
    bad = [(i, n) for i, n in enumerate(site.nodes) if n.role not in known_roles]
    if bad:
        raise ConfigError(
            "\n".join(
                f"{source}: nodes[{i}].role: unknown role {n.role!r}; expected one of {', '.join(known_roles)}"
                for i, n in bad
            )
        )
    # Paths relative to the site file, like an operator writes them; each file checked now,
    # so a wrong one is refused before anything is built or booted.
    base = source.parent if isinstance(source, Path) else Path.cwd()
    if site.tls.acme is not None and site.tls.acme.ca is not None:
        site = site.model_copy(update={"tls": site.tls.model_copy(update={
            "acme": site.tls.acme.model_copy(update={"ca": base / site.tls.acme.ca})})})
        try:
            site.acme_ca()
        except ConfigError as e:
            raise ConfigError(f"{source}: tls.acme.ca: {e.message}", hint=e.hint) from None
    if site.tls.acme is not None and site.tls.acme.dns_update is not None:
        update = site.tls.acme.dns_update
        site = site.model_copy(update={"tls": site.tls.model_copy(update={
            "acme": site.tls.acme.model_copy(update={"dns_update": update.model_copy(update={
                "key": base / update.key})})})})
        try:
            site.acme_tsig_key()
        except ConfigError as e:
            raise ConfigError(f"{source}: tls.acme.dns_update.key: {e.message}", hint=e.hint) from None
    if any(u.openpgp is not None for u in site.users):
        from . import openpgp

        users = []
        for i, u in enumerate(site.users):
            if u.openpgp is not None:
                cert = base / u.openpgp
                u = u.model_copy(update={"openpgp": cert})
                try:
                    openpgp.read_certificate(cert, u.address)
                except ConfigError as e:
                    raise ConfigError(f"{source}: users[{i}].openpgp: {e.message}", hint=e.hint) from None
            users.append(u)
        site = site.model_copy(update={"users": users})
    if site.tls.certificate is not None and site.tls.key is not None:
        site = site.model_copy(update={"tls": site.tls.model_copy(update={
            "certificate": base / site.tls.certificate, "key": base / site.tls.key})})
        try:
            site.site_certificate()
        except ConfigError as e:
            raise ConfigError(f"{source}: tls: {e.message}", hint=e.hint) from None
    return site


# A site file is a page of YAML; anything larger is not one (and is not read whole).
MAX_SITE_BYTES = 1 << 20
# Deeper nesting than any site needs; PyYAML would otherwise recurse until Python gives up.
MAX_NESTING = 32


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last
    one silently) and nesting deeper than a site file can need."""

    def construct_mapping(self, node, deep=False):
        seen: dict[object, yaml.Mark] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key].line + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)

    def compose_node(self, parent, index):
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_NESTING:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_NESTING} levels",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def read_site_text(path: Path) -> str:
    """The site file's text: a regular file, at most MAX_SITE_BYTES, UTF-8. Checked on
    the open descriptor, so a FIFO or a device is refused without blocking or reading."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        raise ConfigError(f"{path}: site file not found", hint="pass --site PATH, or omit it to use sites/example.yaml") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot open the site file: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise ConfigError(f"{path}: {kind}; expected a YAML site file", hint="see sites/example.yaml")
        data = os.read(fd, MAX_SITE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_SITE_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_SITE_BYTES // 1024} KiB; not a site file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: byte offset {e.start}: not UTF-8 text", hint="a site file is UTF-8 YAML") from None
    bad = re.search(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", text)
    if bad:
        raise ConfigError(f"{path}: byte offset {len(text[:bad.start()].encode())}: control character "
                          f"{bad.group()!r} in a text file")
    return text


def load_site(path: Path, known_roles: list[str]) -> Site:
    text = read_site_text(path)
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None
    return parse_site(data, path, known_roles)
