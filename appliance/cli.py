"""./build.py: the single entry point."""
from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from . import host, paths, qemu
from .errors import ApplianceError
from .imagebuild import Builder
from .plan import CONSTANTS_PATH, Plan
from .profiles import ProfileSet
from .site import Site, load_site


@dataclass
class Context:
    site_path: Path
    _profiles: ProfileSet | None = None
    _site: Site | None = None

    @property
    def profiles(self) -> ProfileSet:
        if self._profiles is None:
            self._profiles = ProfileSet.load()
        return self._profiles

    @property
    def site(self) -> Site:
        if self._site is None:
            self._site = load_site(self.site_path, self.profiles.roles)
        return self._site

    def plan(self, role: str, layers: tuple[str, ...] = ()) -> Plan:
        return Plan.of(self.profiles, self.site, role, layers)


class RoleType(click.ParamType):
    name = "ROLE"

    def convert(self, value, param, ctx):
        roles = ProfileSet.load().roles
        if value not in roles:
            self.fail(f"unknown role {value!r}; expected one of: {', '.join(roles)}", param, ctx)
        return value


ROLE = RoleType()


def echo(msg: str) -> None:
    click.echo(msg, err=True)


class Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ApplianceError as e:
            click.secho(f"error: {e.message}", fg="red", err=True)
            if e.hint:
                click.echo(f"hint: {e.hint}", err=True)
            ctx.exit(e.exit_code)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--site", "site_path", type=click.Path(path_type=Path), default=paths.EXAMPLE_SITE,
              show_default="sites/example.yaml", help="Site file describing the cluster.")
@click.pass_context
def main(ctx: click.Context, site_path: Path) -> None:
    """Build, boot, flash and publish the mail cluster's appliance images."""
    ctx.obj = Context(site_path)


@main.command()
@click.option("--check", is_flag=True, help="Only report what is missing; install nothing.")
def setup(check: bool) -> None:
    """Install what this Debian 12 or 13 host needs to build and boot images."""
    host.setup(log=echo, install=not check)


@main.command()
@click.argument("roles", nargs=-1, type=ROLE)
@click.option("--layer", "layers", multiple=True, help="Extra profile layered on top (e.g. test).")
@click.option("--refresh", is_flag=True, help="Rebuild even if cached, re-resolving packages (security updates).")
@click.pass_obj
def build(obj: Context, roles: tuple[str, ...], layers: tuple[str, ...], refresh: bool) -> None:
    """Build the images of ROLES (default: every role the site uses)."""
    site = obj.site  # validate before touching the host
    for layer in layers:
        obj.profiles.get(layer)
    if host.missing():
        echo("the host is missing build dependencies; running setup first")
        host.setup(log=echo)
    builder = Builder(obj.profiles, site, log=echo)
    for role in roles or site.roles:
        art = builder.build(role, tuple(layers), refresh=refresh)
        click.echo(f"{art.raw}  ({'built' if art.built else 'cached'}, input {art.input_hash[:12]})")


@main.command()
@click.pass_obj
def check(obj: Context) -> None:
    """Validate the site file offline (no network, no build) and list every problem."""
    site = obj.site  # raises ConfigError listing each bad key
    roles = ", ".join(f"{len(site.nodes_with_role(r))} {r}" for r in site.roles)
    click.echo(f"{obj.site_path}: site {site.name!r} is valid: {len(site.nodes)} nodes ({roles}), "
               f"{len(site.users)} users, {len(site.backups)} backup pairs")


@main.command()
@click.option("--topology", type=click.Choice(["frontend", "round-robin"]), default=None,
              help="Default: frontend when the site has one, else round-robin.")
@click.option("--check", "resolver", metavar="ADDRESS[:PORT]",
              help="Instead of printing them, ask this resolver for each record and list every one "
                   "that is missing or differs (exit status 1 if any).")
@click.pass_obj
def dns(obj: Context, topology: str | None, resolver: str | None) -> None:
    """Print the DNS records the site's domains need, as a zone-file fragment: MX, A, SPF,
    DKIM (each domain's current selector; the keys are made in the site's secrets on first
    use), DMARC, MTA-STS (with tls.mta_sts: also the policy), TLS-RPT (with tls.reports) and
    TLSA (with the site's certificate)."""
    from .credentials import Secrets
    from .dns import check, records
    if resolver is None:
        click.echo(records(obj.site, topology, Secrets.of(obj.site)), nl=False)
        return
    problems, matched = check(obj.site, resolver, topology, Secrets.of(obj.site))
    for line in matched + problems:
        click.echo(line)
    if problems:
        raise ApplianceError(f"{len(problems)} of {len(problems) + len(matched)} records are missing or differ "
                             f"at {resolver}", hint="publish the records ./build.py dns prints (without --check)")


@main.command()
@click.option("--rules", is_flag=True, help="Print the alert rules file instead.")
@click.option("--interval", default="30s", show_default=True, metavar="DURATION",
              help="How often Prometheus scrapes, and evaluates the rules (e.g. 15s, 1m); a queue's growth is "
              "judged over 20 of them.")
@click.pass_obj
def monitoring(obj: Context, rules: bool, interval: str) -> None:
    """Print a Prometheus scrape configuration for the site: every node's exporter
    (prometheus-node-exporter) and the frontends' HAProxy, each target labelled with its
    node and role. With --rules, the alert rules it names (mailcluster-rules.yml)."""
    import re

    from . import monitoring as mon
    from .errors import ConfigError
    if not re.fullmatch(r"[1-9][0-9]{0,3}[smh]", interval):
        raise ConfigError(f"--interval {interval!r}: expected a number and s, m or h", hint="e.g. --interval 15s")
    site = obj.site
    click.echo(mon.alert_rules(interval) if rules else mon.scrape_config(site, obj.profiles, interval), nl=False)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.option("--timeout", default=5.0, show_default=True, metavar="SECONDS", help="How long to wait for each endpoint.")
@click.pass_obj
def status(obj: Context, as_json: bool, timeout: float) -> None:
    """The cluster at a glance, from a host of the admin network: each node up or down,
    its image, mail store, queues, last backup, certificate and disks, the frontends'
    backends, and whether the nodes agree on the membership. Read from the endpoints
    ./build.py monitoring scrapes; exits 1 when something needs attention, saying what."""
    from . import status as st

    result = st.collect(obj.site, obj.profiles, timeout=timeout)
    click.echo(json.dumps(result, indent=2, sort_keys=True) if as_json else st.table(result), nl=as_json)
    if result["attention"]:
        raise SystemExit(1)


@main.group()
def dkim() -> None:
    """The site's DKIM keys: see each domain's selectors, rotate a domain's key."""


@dkim.command("status")
@click.pass_obj
def dkim_status(obj: Context) -> None:
    """Each domain's selectors: the one the filters sign with, and a rotation's other."""
    from .credentials import Secrets
    from .dkim import state

    for domain in obj.site.mail_domains:
        s = state(Secrets.of(obj.site), domain)
        extra = (f", next {s.next} (published, not signing yet)" if s.next else "") + (
            f", previous {s.previous} (published until {s.retire_after:%Y-%m-%d %H:%M} UTC)" if s.previous else "")
        click.echo(f"{domain}: signing with {s.current}{extra}")


@dkim.command("rotate")
@click.argument("domain")
@click.option("--grace", default=7, show_default=True, type=click.IntRange(1, 365),
              help="Days the old key stays published after the switch.")
@click.option("--check", "resolver", metavar="ADDRESS[:PORT]",
              help="Before switching, ask this resolver that the next key's record is published.")
@click.pass_obj
def dkim_rotate(obj: Context, domain: str, grace: int, resolver: str | None) -> None:
    """Take the next step of DOMAIN's key rotation: publish a new key, switch the filters
    to it, or retire the old one after the grace period (README: DKIM key rotation)."""
    import datetime

    from .credentials import Secrets, dkim_public_key
    from .dkim import check_domain, rotate
    from .dns import publishes

    check_domain(domain, obj.site.mail_domains)
    secrets = Secrets.of(obj.site)

    def published(selector: str) -> bool:
        value = f"v=DKIM1; k=rsa; p={dkim_public_key(secrets.dkim_key(domain, selector))}"
        return publishes(resolver, f"{selector}._domainkey.{domain}.", value) if resolver else True

    click.echo(rotate(secrets, domain, datetime.datetime.now(datetime.timezone.utc),
                      datetime.timedelta(days=grace), published if resolver else None))


@main.command()
@click.argument("node")
@click.option("--format", "fmt", type=click.Choice(["smbios", "files"]), default="smbios", show_default=True,
              help="smbios: one SMBIOS table file for QEMU (-smbios file=OUTPUT); files: one file per "
                   "credential in the directory OUTPUT.")
@click.option("--output", type=click.Path(path_type=Path), required=True,
              help="The file (smbios) or directory (files) to create, readable by you only.")
@click.pass_obj
def credentials(obj: Context, node: str, fmt: str, output: Path) -> None:
    """Everything that makes NODE itself (identity, peers, keys) as systemd credentials.

    The image of a role is the same for all its nodes; these credentials, delivered at
    boot, make one of them NODE. They contain secrets: keep them like keys."""
    import shlex

    from .credentials import Secrets, node_credentials

    site = obj.site
    target = site.node(node)
    creds = node_credentials(site, target, target.mac, Secrets.of(site))
    if fmt == "smbios":
        # A file, not arguments: secrets on QEMU's command line are readable by every user.
        if output.exists():
            raise ApplianceError(f"{output} exists", hint="choose a new file name; nothing was written")
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(qemu.smbios_table(creds))
        echo(f"{len(creds)} credentials for {target.name} ({target.role}) in {output}")
        click.echo(f"-smbios file={shlex.quote(str(output.resolve()))}")
        return
    if output.exists() and any(output.iterdir()):
        raise ApplianceError(f"{output} is not empty", hint="choose a new directory; nothing was written")
    output.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name, value in creds.items():
        path = output / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(value)
    echo(f"{len(creds)} credentials for {target.name} ({target.role}) in {output}")


@main.command("list")
@click.pass_obj
def list_(obj: Context) -> None:
    """List the roles and what each contains on the site."""
    ps = obj.profiles
    for role in ps.roles:
        plan = obj.plan(role)
        click.echo(f"{role}: {ps.get(role).description}")
        click.echo(f"  layers:   {' -> '.join(l.name for l in plan.layers)}")
        click.echo(f"  packages: {', '.join(plan.packages)}")
        click.echo(f"  overlays: {', '.join(o for l in plan.layers for o in l.overlays)}")
        click.echo(f"  services: {', '.join(plan.services.enable)}")
        shown = [f"{name} {p.port}" + ("" if p.allow == ["world"] else f" ({'/'.join(p.allow)} only)")
                 for name, p in plan.ports.items()]
        click.echo(f"  ports:    {', '.join(shown)}")
    others = sorted(n for n, p in ps.profiles.items() if p.kind != "role")
    click.echo(f"layers: {', '.join(others)}")


@main.command()
@click.argument("role", type=ROLE)
@click.option("--layer", "layers", multiple=True, help="Extra profile layered on top (e.g. test).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--mkosi", "with_mkosi", is_flag=True,
              help="Also render the mkosi configuration and print it with its input hash (asks Debian's "
                   "archive for its state, as a build does).")
@click.pass_obj
def show(obj: Context, role: str, layers: tuple[str, ...], as_json: bool, with_mkosi: bool) -> None:
    """Print the plan of ROLE's image for the site: layers, packages, services, ports and
    who may reach each, partitions, checks, and the constants its scripts read. Offline
    unless --mkosi."""
    for layer in layers:
        obj.profiles.get(layer)
    doc: dict[str, Any] = obj.plan(role, layers).describe()
    if with_mkosi:
        builddir, digest = Builder(obj.profiles, obj.site, log=echo).render(role, tuple(layers))
        doc["input_hash"] = digest
        doc["build_directory"] = str(builddir)
        doc["mkosi"] = {p.name: p.read_text() for p in sorted((builddir / "mkosi.conf.d").glob("*.conf"))}
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    for key, value in doc.items():
        if key == "mkosi":
            click.echo("mkosi drop-ins (applied in order; later settings win, lists append):")
            for name, text in value.items():
                click.echo(f"  --- {name}")
                click.echo("".join(f"    {line}\n" for line in text.splitlines()), nl=False)
        elif key == "constants":
            click.echo(f"constants ({CONSTANTS_PATH} in the image):")
            click.echo("".join(f"    {line}\n" for line in value.splitlines()), nl=False)
        else:
            click.echo(f"{key}: {json.dumps(value) if not isinstance(value, str) else value}")


@main.command()
@click.argument("role", type=ROLE, required=False)
@click.option("--cluster", is_flag=True, help="Boot every node of the site on a private network instead.")
@click.option("--node", help="Boot as this node of the site (default: the role's first node).")
@click.option("--fresh", is_flag=True, help="Discard the VM's previous disk state.")
@click.option("--memory", default=1024, show_default=True, help="Guest memory in MiB (per node).")
@click.pass_obj
def run(obj: Context, role: str | None, cluster: bool, node: str | None, fresh: bool, memory: int) -> None:
    """Boot ROLE's image in QEMU with its serial console on this terminal, or with
    --cluster every node of the site, until the cluster accepts mail."""
    from .credentials import node_credentials

    site = obj.site
    if cluster:
        if role or node:
            raise ApplianceError("--cluster boots every node of the site; give no ROLE and no --node")
        run_cluster(obj, memory)
        return
    if role is None:
        raise ApplianceError("give a ROLE to boot one node, or --cluster for the whole site",
                             hint=f"roles: {', '.join(obj.profiles.roles)}")
    nodes = site.nodes_with_role(role)
    target = site.node(node) if node else (nodes[0] if nodes else None)
    if target is None:
        raise ApplianceError(f"site {site.name!r} has no {role} node", hint="pass --node NAME")
    if target.role != role:
        raise ApplianceError(f"node {target.name!r} has role {target.role!r}, not {role!r}")
    plan = obj.plan(role)
    image = plan.image()
    if not image.exists():
        raise ApplianceError(f"{image}: no image built for role {role}", hint=f"run ./build.py build {role}")
    declared = plan.ports
    ports = plan.port_numbers()
    spec = qemu.VMSpec(
        name=target.name, image=image, state_dir=image.parent / "run" / target.name,
        memory_mb=memory, forwards={p: qemu.free_port() for p in plan.forwarded_ports},
        credentials=node_credentials(site, target, None, plan.secrets), interactive=True,
    )
    existing = spec.disk.exists() and not fresh
    qemu.prepare(spec, fresh=not existing)
    echo(f"booting {target.name} ({role}) under TCG; this takes about a minute")
    if plan.tls:
        echo(f"  TLS: {plan.tls}")
    for name, guest in ports.items():
        # This host is outside the site's networks: the node's firewall answers it only
        # on the ports open to the world.
        reach = "" if "world" in declared[name].allow else f"  (firewall: {'/'.join(declared[name].allow)} only)"
        echo(f"  {name:6} guest port {guest:4} -> 127.0.0.1:{spec.forwards[guest]}{reach}")
    echo("  serial console below; Ctrl-A X quits QEMU, Ctrl-C powers the guest off")
    proc = qemu.QemuProcess(spec)
    proc.start()

    def power_off(*_):
        echo("\npowering the guest off (ACPI); Ctrl-A X kills QEMU at once")
        proc.qmp("system_powerdown")

    signal.signal(signal.SIGINT, power_off)
    proc.wait_exit(timeout=None)
    echo(f"{target.name} is off; its disk is kept in {spec.state_dir} (--fresh discards it)")


@main.command()
@click.argument("image")
@click.option("--device", "device", required=True, type=click.Path(path_type=Path),
              help="The whole disk to write, e.g. /dev/sdb (or a file with --to-file).")
@click.option("--node", "node_name", required=True, help="The site's node this machine becomes.")
@click.option("--to-file", is_flag=True, help="Allow --device to be a regular file (written as an image file).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--with-mailstore-key", is_flag=True,
              help="Also put the node's eCryptfs key (a mailstore's mail store, a filter's queue) on the ESP "
                   "(evaluation only: anyone with the disk can read it).")
@click.option("--trust", "trust", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="For a registry reference: the OpenPGP public key(s) releases must be signed with.")
@click.pass_obj
def flash(obj: Context, image: str, device: Path, node_name: str, to_file: bool, yes: bool,
          with_mailstore_key: bool, trust: Path | None) -> None:
    """Write IMAGE (a file, or a registry reference) onto DEVICE as NODE.

    Only the image's data blocks are written (bmap); they are read back from the device
    and compared with the image's checksums; then the node's credentials go onto the
    ESP, so the machine boots as NODE."""
    from . import flash as fl

    site = obj.site
    node = site.node(node_name)
    path = Path(image)
    if not path.exists() and fl.looks_like_reference(image):
        from . import registry
        path = registry.pull_role(image, node.role, trust, log=echo)
    elif not path.exists():
        raise ApplianceError(f"{image}: no such image file", hint="name a .raw file or a registry reference REGISTRY/REPO:TAG")
    role = fl.image_role(path)
    if role is not None and role != node.role:
        raise ApplianceError(f"{path.name} is a {role} image but node {node.name} is a {node.role}; nothing was written",
                             hint=f"flash the {node.role} image")
    expected = fl.recorded_sha256(path)
    # The image's own partition table first: a file that is not a disk image is refused
    # before anything is written.
    fl.esp_extent(path)
    target = fl.inspect_target(device, to_file)
    try:
        _flash_onto(obj, path, expected, target, node, yes, with_mailstore_key)
    finally:
        target.close()


def _flash_onto(obj: Context, path: Path, expected: str, target, node, yes: bool, with_mailstore_key: bool) -> None:
    from . import flash as fl
    from .credentials import STORE_KEYS, Secrets, node_credentials

    site, device = obj.site, target.path
    size = path.stat().st_size
    if target.size is not None and target.size < size:
        raise fl.FlashError(f"{device} is too small: {target.size / 1e9:.2f} GB for a {size / 1e9:.2f} GB image; "
                            "nothing was written", hint="use a larger disk")
    fl.verify_image(path, expected, echo)
    bmap = fl.load_bmap(fl.ensure_bmap(path))
    if node.mac is None:
        echo(f"note: the site gives no MAC for {node.name}: its cluster address goes to every en* NIC")
    if not yes:
        click.confirm(f"Write {path.name} onto {device} ({target.description}) as {node.name}? "
                      "Everything on it is lost.", abort=True, err=True)
    fl.write_image(path, bmap, target, echo)
    creds = node_credentials(site, node, node.mac, Secrets.of(site))
    # The ESP is readable by whoever holds the disk: the keys to the encrypted stores (a
    # mailstore's mail, a filter's queue) must not lie beside it (README: "Supplying the
    # mailstore key on bare metal").
    withheld = [name for name in STORE_KEYS if name in creds]
    if withheld and not with_mailstore_key:
        for name in withheld:
            del creds[name]
        echo(f"note: {', '.join(withheld)} is not written to the disk; give it to the node as README "
             "'Supplying the mailstore key on bare metal' says (its mail services wait for it)")
    fl.write_credentials(target.io_path, creds, echo)
    click.echo(f"{device}: {path.name} written and verified ({bmap.mapped_bytes / 1e6:.0f} MB of data), "
               f"boots as {node.name}")


@main.command()
@click.option("--to", "to", required=True, help="REGISTRY/REPOSITORY:TAG to publish the release under.")
@click.option("--sign-key", required=True, envvar="MAILCLUSTER_SIGN_KEY",
              help="OpenPGP key (id or fingerprint in your gpg keyring) that signs the release.")
@click.option("--role", "roles", multiple=True, type=ROLE, help="Only these roles (default: every role the site uses).")
@click.option("--layer", "layers", multiple=True, help="Publish the images built with these extra layers.")
@click.option("--version", "version", help="Release version for the annotations (default: the tag).")
@click.pass_obj
def publish(obj: Context, to: str, sign_key: str, roles: tuple[str, ...], layers: tuple[str, ...],
            version: str | None) -> None:
    """Push each role's release image to a registry as a signed OCI artifact.

    Registry credentials come from MAILCLUSTER_REGISTRY_USERNAME/PASSWORD or the podman
    and docker auth files (podman login / docker login), never from the command line."""
    from . import registry

    site = obj.site
    ref = registry.Ref.parse(to)
    images = {}
    for role in roles or site.roles:
        image = obj.plan(role, layers).image()
        if not image.exists():
            raise ApplianceError(f"{image}: not built", hint=f"run ./build.py build {role}" +
                                 "".join(f" --layer {l}" for l in layers))
        images[role] = image
    index, releases = registry.publish(ref, images, sign_key, version, log=echo)
    for r in releases:
        click.echo(f"{r.role}: {ref.registry}/{ref.repository}@{r.digest}")
        for name, digest in r.files.items():
            click.echo(f"  {name}  {digest}")
    click.echo(f"{ref}  index {index}")


@main.command()
@click.argument("reference")
@click.option("--trust", required=True, type=click.Path(path_type=Path, exists=True, dir_okay=False),
              envvar="MAILCLUSTER_TRUST", help="OpenPGP public key(s) releases must be signed with.")
@click.option("--role", "roles", multiple=True, type=ROLE, help="Only these roles (default: every role the site uses).")
@click.option("--output", type=click.Path(path_type=Path), help="Directory (default: images/pulled/TAG).")
@click.option("--allow-older", is_flag=True,
              help="Accept a release older than one already pulled from this repository (a deliberate rollback).")
@click.pass_obj
def pull(obj: Context, reference: str, trust: Path, roles: tuple[str, ...], output: Path | None,
         allow_older: bool) -> None:
    """Fetch release images, verify digests and signature; refuse anything else."""
    from . import registry

    ref = registry.Ref.parse(reference)
    out = output or paths.IMAGES / "pulled" / (ref.tag or ref.reference.replace(":", "-"))
    for role in roles or obj.site.roles:
        raw = registry.pull(ref, role, trust, out / role, log=echo, allow_older=allow_older)
        click.echo(f"{raw}  (verified: digests, signature, SHA256SUMS)")


@main.command()
@click.option("--output", type=click.Path(path_type=Path), default=Path("dist/mailcluster.pyz"), show_default=True)
def dist(output: Path) -> None:
    """Package the builder as one executable file (a zipapp with profiles, overlays and
    its Python dependencies) for hosts with Python 3 and mkosi."""
    from . import dist as d

    out = d.make(output)
    click.echo(f"{out}  ({out.stat().st_size / 1e6:.1f} MB; runs on {d.python_tag()} hosts: "
               f"python3 {out.name} --help)")


def run_cluster(obj: Context, memory: int) -> None:
    """Every node on one private switch, fresh disks, 127.0.0.1 forwards; Ctrl-C powers
    every guest off through ACPI."""
    import time

    from .credentials import Secrets
    from .vm import Cluster, MachineError

    site = obj.site
    plans = {role: obj.plan(role) for role in site.roles}
    images = {role: plan.image() for role, plan in plans.items()}
    for role, image in images.items():
        if not image.exists():
            raise ApplianceError(f"{image}: no image built for role {role}", hint="run ./build.py build")
    c = Cluster(site, images, paths.IMAGES / site.name / "run-cluster",
                plans=plans,
                secrets=Secrets.of(site), agent=False, memory_mb=memory)
    names = [n.name for n in site.nodes]
    try:
        echo(f"booting {', '.join(names)} under TCG ({memory} MiB each); "
             f"serial consoles in {c.workdir}/NODE/serial.log")
        served = [(role, plan.tls) for role, plan in plans.items() if plan.tls]
        if served:
            echo(f"TLS ({', '.join(r for r, _ in served)}): {served[0][1]}")
        started = time.monotonic()
        c.boot(*names)
        c.wait_accepting_mail(timeout=1800)
        click.echo(f"the cluster accepts mail ({time.monotonic() - started:.0f} s after start):")
        click.echo(c.access())
        echo("Ctrl-C powers every node off")
        while True:
            stopped = [m.name for m in c.machines.values() if not m.process.running]
            if stopped:
                raise ApplianceError(f"{', '.join(stopped)} stopped on its own",
                                     hint=f"see {c.workdir}/NODE/serial.log")
            time.sleep(1)  # idle until Ctrl-C; nothing is being waited for
    except KeyboardInterrupt:
        echo("\npowering every node off (ACPI)")
    except MachineError as e:
        raise ApplianceError(str(e)) from None
    finally:
        c.shutdown()
        echo(f"all nodes are off; their disks are in {c.workdir} (the next run starts fresh)")


if __name__ == "__main__":
    main()
