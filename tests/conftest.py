"""Shared fixtures: the example site, test-layer images (built once per input hash), VMs."""
from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
from pathlib import Path

import pytest

from appliance import archive, paths, vm
from appliance.errors import ApplianceError
from appliance.imagebuild import Builder
from appliance.plan import Plan
from appliance.profiles import ProfileSet
from appliance.site import Alias, CatchAll, Tls, User, load_site
from appliance.credentials import Secrets
from appliance.vm import Cluster, Machine
from tests.internet import PLAIN, Internet, address_on, site_zones
from tests.receiver import REFUSED
from tests.tools import openpgp_key, site_certificate, stop_gpg_agents

_live: list[Machine] = []

# A terminated run (a CI time limit, a stopped job) unwinds like Ctrl-C: pytest stops the
# session and fixtures still power their guests off. (SystemExit would only fail the
# current test, and the next one would boot a new cluster.)
def _terminated(*_):
    raise KeyboardInterrupt("terminated (SIGTERM)")


signal.signal(signal.SIGTERM, _terminated)


CPU_LOG_ENV = "MAILCLUSTER_GUEST_CPU_LOG"


def pytest_configure(config):
    """One state of the Debian archive for the whole run: xdist workers and the builds
    they start inherit it, so a package Debian publishes mid-run changes no image. And one
    file where every worker accounts its guests' CPU time."""
    if not hasattr(config, "workerinput"):
        if archive.PIN_ENV not in os.environ:
            try:
                os.environ[archive.PIN_ENV] = archive.current().to_json()
            except ApplianceError:
                pass  # each build then asks itself, and says what is wrong
        fd, path = tempfile.mkstemp(prefix="guest-cpu-", suffix=".jsonl")
        os.close(fd)
        os.environ[CPU_LOG_ENV] = path
    if os.environ.get(CPU_LOG_ENV):
        vm.CPU_LOG = Path(os.environ[CPU_LOG_ENV])


def pytest_terminal_summary(terminalreporter, config):
    """What the guests cost: under TCG the suite's time is their CPU time."""
    if hasattr(config, "workerinput") or not vm.CPU_LOG or not vm.CPU_LOG.exists():
        return
    runs = [json.loads(line) for line in vm.CPU_LOG.read_text().splitlines() if line.strip()]
    vm.CPU_LOG.unlink()
    if not runs:
        return
    per: dict[str, list[dict]] = {}
    for r in runs:
        per.setdefault(r["name"], []).append(r)
    terminalreporter.section("guest CPU (QEMU runs, CPU seconds each)")
    for name, rs in sorted(per.items(), key=lambda kv: -sum(r["cpu"] for r in kv[1])):
        terminalreporter.write_line(f"{name:10} {sum(r['cpu'] for r in rs):7.0f} CPU-s in {len(rs)} runs: "
                                    + ", ".join(f"{r['cpu']:.0f}" for r in rs))
    terminalreporter.write_line(f"{'all':10} {sum(r['cpu'] for r in runs):7.0f} CPU-s in {len(runs)} runs")


@pytest.fixture(scope="session", autouse=True)
def _gpg_agents():
    """GnuPG starts an agent for each home a test made a key in: stop them all."""
    yield
    stop_gpg_agents()


@pytest.fixture(scope="session")
def profiles() -> ProfileSet:
    return ProfileSet.load()


@pytest.fixture(scope="session")
def site(profiles):
    return load_site(paths.EXAMPLE_SITE, profiles.roles)


@pytest.fixture(scope="session")
def test_images(profiles, site):
    """Every role's image with the test layer. xdist workers share one build per input
    hash through the builder's lock and store; an unchanged tree builds nothing."""
    builder = Builder(profiles, site, log=lambda m: print(f"[build] {m}", file=sys.stderr, flush=True))
    return {role: builder.build(role, TEST_LAYERS).raw for role in profiles.roles}


TEST_LAYERS = ("test",)


def plans_of_test_images(profiles, site) -> dict[str, Plan]:
    """Each role's test image's plan: what a cluster of test images forwards and where."""
    return {role: Plan.of(profiles, site, role, TEST_LAYERS) for role in profiles.roles}


@pytest.fixture(scope="session")
def secrets(tmp_path_factory) -> Secrets:
    """This run's secrets (generated, like an operator's first use of the site)."""
    return Secrets(tmp_path_factory.mktemp("secrets") / "example")


# The nodes every mail-path test needs. One TCG boot costs about a minute of both cores
# per guest, so one booted cluster serves every VM module in turn (they share an xdist
# group, so one worker runs them in order). A module that breaks something repairs it
# before it ends; each module's own fixture waits for what it needs.
SHARED_NODES = ("fe1", "filter1", "filter2", "store1")


@pytest.fixture(scope="session")
def site_tls(tmp_path_factory, site) -> tuple[Path, Path, Path]:
    """A certificate for the site's names from a CA of this run: (chain, key, CA)."""
    return site_certificate(tmp_path_factory.mktemp("site-tls"), [f"mx.{site.domain}", f"*.{site.domain}"])


# A user of the shared cluster with an OpenPGP certificate: mail to it is stored encrypted.
OPENPGP_USER = "dave@example.test"


@pytest.fixture(scope="session")
def openpgp_user(tmp_path_factory) -> tuple[str, Path]:
    """(OPENPGP_USER, the GnuPG home that holds the user's secret key)."""
    home = tmp_path_factory.mktemp("gnupg") / "user"
    openpgp_key(home, OPENPGP_USER)
    return OPENPGP_USER, home


@pytest.fixture(scope="session")
def mail_cluster(tmp_path_factory, site, profiles, test_images, secrets, site_tls, openpgp_user):
    # The shared cluster serves a site certificate (the operator's case worth testing end
    # to end); the self-signed fallback is the same unit's other branch (tests/unit/test_tls.py).
    # It also has a catch-all (off in the example): example.com's other addresses go to carol.
    # And OPENPGP_USER, who gave the site an OpenPGP certificate (tests/vm/test_openpgp.py).
    # Its nodes resolve names through the test Internet (tests/internet.py) on their switch,
    # where the filters deliver users' mail to other domains.
    internet_at = address_on(site.network.cluster)
    changed = site.model_copy(update={
        "tls": Tls(certificate=site_tls[0], key=site_tls[1]),
        "catch_all": [CatchAll(domain="example.com", to=["carol@example.test"])],
        # An alias whose only target the test Internet refuses: the filters bounce its mail.
        "aliases": [*site.aliases, Alias(address=f"away@{site.domain}", to=[f"{REFUSED}@{PLAIN}"])],
        "users": [*site.users, User(address=OPENPGP_USER, openpgp=openpgp_user[1] / f"{OPENPGP_USER}.asc")],
        "network": site.network.model_copy(update={"resolvers": [internet_at.ip]})})
    workdir = tmp_path_factory.mktemp("mail-cluster")
    c = Cluster(changed, test_images, workdir, plans=plans_of_test_images(profiles, site), secrets=secrets)
    c.switch.start()
    # It serves the site's zones as ./build.py dns prints them (the ACME CA there looks up
    # the names it validates).
    c.internet = internet = Internet(workdir / "internet", c.switch.directory, internet_at,
                                     site_zones(changed, secrets))
    try:
        internet.start()
        boot(c, *SHARED_NODES)
        # What `./build.py run --cluster` waits for before it prints the endpoints.
        c.wait_accepting_mail()
        yield c
    finally:
        for m in c.machines.values():
            if m in _live:
                _live.remove(m)
        c.close()
        internet.stop()


def boot(cluster: Cluster, *names: str) -> list[Machine]:
    """Start the named nodes together, through the code `./build.py run --cluster` uses."""
    return cluster.boot(*names, created=_live.extend)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        for m in list(_live):
            report.sections.append((f"serial console of {m.name} (last lines)", m.serial_tail(60)))
