"""The DNS records a site needs, for either inbound topology: MX, A, SPF, DKIM, DMARC,
TLS-RPT, MTA-STS when the site publishes a policy, and TLSA (DANE) when the site gives its
certificate; and the check of what a resolver says is published against them.

frontend: the MX points at the frontends; HAProxy spreads connections over the filters.
round-robin: no frontend; one MX name with an A record per filter, so resolvers rotate
over them and senders retry the next address when one is down.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import ConfigError
from .site import Node, Site

if TYPE_CHECKING:
    from .credentials import Secrets

TTL = 3600


def _addr(node: Node) -> tuple[str, str]:
    if node.public_address is not None:
        return str(node.public_address), ""
    return str(node.address), "  ; cluster address: set nodes[].public_address for the real one"


def txt(value: str) -> str:
    """A TXT record's data: strings of at most 255 characters (RFC 1035), which a
    verifier joins back together (a 2048-bit DKIM key does not fit in one)."""
    return " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))


def dkim_records(site: Site, secrets: "Secrets") -> dict[str, str]:
    """Each domain's DKIM records: owner name -> TXT value (as one string). The current
    selector's, and during a rotation the next or the previous one's (appliance/dkim.py)."""
    from .credentials import dkim_public_key
    from .dkim import state

    return {f"{selector}._domainkey.{d}.": f"v=DKIM1; k=rsa; p={dkim_public_key(secrets.dkim_key(d, selector))}"
            for d in site.mail_domains for selector in state(secrets, d).published}


def dmarc_record(site: Site) -> str:
    value = f"v=DMARC1; p={site.dmarc.policy}"
    if site.dmarc.reports:
        value += f"; rua=mailto:{site.dmarc.reports}"
    return value


def mta_sts_policy(site: Site) -> str:
    """The MTA-STS policy (RFC 8461, 3.2) the frontends serve for every site domain: the
    MX hosts, whose certificates the filters get from the ACME CA for those names."""
    sts = site.tls.mta_sts
    assert sts is not None
    lines = ["version: STSv1", f"mode: {sts.mode}", *(f"mx: {h.rstrip('.')}" for h in mx_hosts(site)),
             f"max_age: {sts.max_age}"]
    return "".join(f"{line}\r\n" for line in lines)


def mta_sts_record(site: Site) -> str:
    """The _mta-sts TXT record: its id changes whenever the policy does, which is what
    tells senders to fetch it again."""
    import hashlib

    return f"v=STSv1; id={hashlib.sha256(mta_sts_policy(site).encode()).hexdigest()[:20]}"


@dataclass(frozen=True)
class Record:
    name: str  # absolute, with the trailing dot
    type: str  # MX, A, TXT, TLSA
    value: str  # the record's data as a zone file writes it (a TXT record's: one unquoted string)
    note: str = ""  # a comment for the operator, after the record

    def line(self) -> str:
        data = txt(self.value) if self.type == "TXT" else self.value
        return f"{self.name}\tIN {self.type}\t{data}{self.note}"


def topology_of(site: Site, topology: str | None) -> str:
    frontends, filters = site.nodes_with_role("frontend"), site.nodes_with_role("filter")
    topology = topology or ("frontend" if frontends else "round-robin")
    if topology == "frontend":
        if not frontends:
            raise ConfigError(f"site {site.name!r} has no frontend node; the frontend topology needs one",
                              hint="add a node with role: frontend, or pass --topology round-robin")
    elif topology == "round-robin":
        if not filters:
            raise ConfigError(f"site {site.name!r} has no filter node to receive mail",
                              hint="add nodes with role: filter")
        if frontends:
            # The filters' postscreen expects HAProxy's PROXY header on port 25.
            raise ConfigError(f"site {site.name!r} has frontend nodes, so its filters only accept "
                              "connections through them", hint="remove the frontend nodes from the site "
                              "and rebuild the filter image to use round-robin DNS")
    else:
        raise ConfigError(f"unknown topology {topology!r}", hint="expected frontend or round-robin")
    return topology


def mx_hosts(site: Site, topology: str | None = None) -> list[str]:
    """The MX host names (absolute): the frontends', or one name for every filter."""
    if topology_of(site, topology) == "frontend":
        return [f"{n.name}.{site.domain}." for n in site.nodes_with_role("frontend")]
    return [f"mx.{site.domain}."]


def record_groups(site: Site, topology: str | None = None,
                  secrets: "Secrets | None" = None) -> tuple[str, list[list[Record]]]:
    """The topology, and every record the site needs in groups (MX, A, SPF, DKIM, DMARC,
    MTA-STS, TLS-RPT, TLSA)."""
    topology = topology_of(site, topology)
    frontends, filters = site.nodes_with_role("frontend"), site.nodes_with_role("filter")
    hosts = mx_hosts(site, topology)
    if topology == "frontend":
        a_records = [(f"{n.name}.{site.domain}.", *_addr(n)) for n in frontends]
    else:
        # One name, several A records: every filter is an equal MX.
        a_records = [(f"mx.{site.domain}.", *_addr(n)) for n in filters]
    standby = {p.backup for p in site.backups}
    groups = [
        [Record(f"{d}.", "MX", f"10 {host}") for d in site.mail_domains for host in hosts],
        [Record(name, "A", addr, note) for name, addr, note in a_records],
        # The names users reach their mailstore by (IMAP, submission): a standby backup
        # gets its record when it takes over.
        [Record(f"{n.name}.{site.domain}.", "A", *_addr(n)) for n in site.nodes_with_role("mailstore")
         if n.name not in standby],
        # The names the filters greet with (HELO: their myhostname) when they send out:
        # receivers check that each resolves to the address the mail came from.
        [Record(f"{n.name}.{site.domain}.", "A", *_addr(n)) for n in filters],
        # Outgoing mail leaves through the filters: that is what SPF must allow.
        [Record(f"{d}.", "TXT", "v=spf1 " + " ".join(f"ip4:{_addr(n)[0]}" for n in filters) + " -all")
         for d in site.mail_domains],
    ]
    if secrets is not None:
        # The filters sign outgoing mail with each domain's current selector.
        groups.append([Record(name, "TXT", value) for name, value in dkim_records(site, secrets).items()])
    groups.append([Record(f"_dmarc.{d}.", "TXT", dmarc_record(site)) for d in site.mail_domains])
    if site.tls.mta_sts is not None:
        # The policy's host names lead to the frontends, which serve it (and answer the
        # ACME CA's HTTP-01 challenges for those names).
        groups.append([Record(f"mta-sts.{d}.", "A", *_addr(n)) for d in site.mail_domains for n in frontends])
        groups.append([Record(f"_mta-sts.{d}.", "TXT", mta_sts_record(site)) for d in site.mail_domains])
    if site.wkd is not None:
        # The Web Key Directory's names (the advanced method's openpgpkey.DOMAIN; with
        # wkd.direct the domain itself) lead to the frontends, which serve it.
        groups.append([Record(f"openpgpkey.{d}.", "A", *_addr(n)) for d in site.mail_domains for n in frontends])
        if site.wkd.direct:
            groups.append([Record(f"{d}.", "A", *_addr(n)) for d in site.mail_domains for n in frontends])
    if site.tls.reports:
        groups.append([Record(f"_smtp._tls.{d}.", "TXT", f"v=TLSRPTv1; rua=mailto:{site.tls.reports}")
                       for d in site.mail_domains])
    cert = site.site_certificate()
    if cert is not None:
        # DANE-EE, the key's SHA-256: it survives a renewal that keeps the key. A new key
        # needs its record published beside the old one a few TTLs before it is installed.
        groups.append([Record(f"_25._tcp.{host}", "TLSA", f"3 1 1 {cert.spki_sha256}") for host in hosts])
    return topology, [g for g in groups if g]


# What the operator is told above a group of records (by type; an A group by its first name).
COMMENTS: dict[str, tuple[str, ...]] = {
    "TLSA": ("DANE for senders that check it: the site certificate's key. Before a new key is",
             "installed, publish its record too (./build.py dns with the new tls: files) and wait",
             f"two TTLs ({2 * TTL} s); remove the old record after the switch."),
}


def records(site: Site, topology: str | None = None, secrets: "Secrets | None" = None) -> str:
    """Every record the site needs, as a zone-file fragment (absolute names)."""
    topology, groups = record_groups(site, topology, secrets)
    filters = site.nodes_with_role("filter")
    comments: dict[str, tuple[str, ...]] = dict(COMMENTS)
    if filters:
        comments[f"{filters[0].name}.{site.domain}."] = (
            "The filters' own names (their HELO when they send out); also ask each address's",
            "provider for its reverse (PTR) record, giving the name back.")
    if site.tls.mta_sts is not None:
        comments[f"mta-sts.{site.domain}."] = (
            "MTA-STS: these names lead to the frontends, which serve the policy at",
            "https://mta-sts.DOMAIN/.well-known/mta-sts.txt with a certificate from the ACME CA:",
            *(f"  {line}" for line in mta_sts_policy(site).splitlines()),
            "_mta-sts's id changes with the policy; senders keep the old one until max_age.")
    if site.wkd is not None:
        comments[f"openpgpkey.{site.domain}."] = (
            "Web Key Directory: these names lead to the frontends, which serve the users' OpenPGP",
            "certificates at https://openpgpkey.DOMAIN/.well-known/openpgpkey/DOMAIN/hu/HASH",
            "with a certificate from the ACME CA.")
        if site.wkd.direct:
            comments[f"{site.domain}."] = (
                "WKD's direct method (wkd.direct): the domains themselves lead to the frontends, which",
                "serve https://DOMAIN/.well-known/openpgpkey/ (and nothing else there). If a web site",
                "has these names, leave wkd.direct out instead: the advanced method above suffices.")
    out = [f"; DNS for site {site.name} ({topology} topology). Generated by ./build.py dns.",
           f"$TTL {TTL}"]
    for group in groups:
        out.append("")
        out += [f"; {line}" for line in comments.get(group[0].name if group[0].type == "A" else group[0].type, ())]
        out += [r.line() for r in group]
    if not any(g[0].type == "TLSA" for g in groups):
        why = ("each node's certificate from the ACME CA has a key of its own, which the builder never sees"
               if site.tls.acme is not None
               else "the nodes use self-signed certificates of their own")
        out += ["", f"; No TLSA (DANE) records: {why};",
                "; give the site file tls.certificate and tls.key to publish them."]
    return "\n".join(out) + "\n"


# What identifies "the" record of its kind among a name's TXT records (a domain's apex
# holds other TXT records too, and exactly one SPF record).
_TXT_KINDS = ("v=spf1", "v=DKIM1", "v=DMARC1", "v=TLSRPTv1", "v=STSv1")


def _kind(value: str) -> str:
    return next((k for k in _TXT_KINDS if value.startswith(k + ";") or value.startswith(k + " ") or value == k),
                value)


def parse_resolver(text: str) -> tuple[str, int]:
    """ADDRESS or ADDRESS:PORT (IPv6: [ADDRESS]:PORT)."""
    import ipaddress

    host, port = text, "53"
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":") or "53"
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        ipaddress.ip_address(host)
        number = int(port)
        if not 0 < number < 65536:
            raise ValueError
    except ValueError:
        raise ConfigError(f"--resolver {text!r}: expected an IP address, optionally with :PORT",
                          hint="the resolver to ask, e.g. 192.0.2.53 or 127.0.0.1:5353 ([2001:db8::53]:53 for IPv6)") from None
    return host, number


def _resolver(text: str):
    import dns.resolver

    host, port = parse_resolver(text)
    res = dns.resolver.Resolver(configure=False)
    res.nameservers, res.port, res.lifetime, res.cache = [host], port, 5.0, None
    return res


def lookup(resolver: str, name: str, rtype: str) -> list[str]:
    """What `resolver` answers for `name` and `rtype` (TXT: each record's strings joined);
    empty when the name or the record does not exist. ConfigError when it does not answer."""
    import dns.exception
    import dns.resolver

    try:
        answer = _resolver(resolver).resolve(name, rtype, raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN:
        return []
    except (dns.resolver.NoNameservers, dns.exception.Timeout) as e:
        raise ConfigError(f"the resolver at {resolver} gave no answer for {name} {rtype}: {e}",
                          hint="name a resolver that answers this host (ADDRESS[:PORT])") from None
    return [] if answer.rrset is None else [_published(rd) for rd in answer.rrset]


def publishes(resolver: str, name: str, value: str) -> bool:
    """Whether `resolver` answers `name` with the TXT record `value`."""
    return value in lookup(resolver, name, "TXT")


def check(site: Site, resolver: str, topology: str | None = None,
          secrets: "Secrets | None" = None) -> tuple[list[str], list[str]]:
    """Ask `resolver` for every record the site needs: (problems, what matched), one line
    each naming the record. Raises ConfigError when the resolver does not answer."""
    parse_resolver(resolver)  # a bad address is refused before any query
    _, groups = record_groups(site, topology, secrets)
    wanted: dict[tuple[str, str], list[Record]] = {}
    for r in (r for g in groups for r in g):
        wanted.setdefault((r.name, r.type), []).append(r)

    problems, matched = [], []
    for (name, rtype), expected in wanted.items():
        published = lookup(resolver, name, rtype)
        if rtype == "TXT":
            for r in expected:
                same_kind = [p for p in published if _kind(p) == _kind(r.value)]
                if r.value in same_kind:
                    matched.append(f"ok       {name} TXT {_kind(r.value)}")
                elif same_kind:
                    problems.append(f"differs  {name} TXT: published {same_kind[0]!r}; needed {r.value!r}")
                else:
                    problems.append(f"missing  {name} TXT {txt(r.value)}")
            continue
        want = sorted(r.value.lower() for r in expected)
        have = sorted(p.lower() for p in published)
        if want == have:
            matched.append(f"ok       {name} {rtype}")
        elif not have:
            problems += [f"missing  {r.line()}" for r in expected]
        else:
            problems.append(f"differs  {name} {rtype}: published {', '.join(have)}; needed {', '.join(want)}")
    return problems, matched


def _published(rdata) -> str:
    import dns.rdatatype

    if rdata.rdtype == dns.rdatatype.TXT:
        return b"".join(rdata.strings).decode(errors="replace")
    return rdata.to_text()
