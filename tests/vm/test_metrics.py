"""A real Prometheus, with the configuration and rules ./build.py monitoring prints,
scraping the booted cluster from the admin network (the test Internet's namespace on
the cluster's switch is inside it). From outside, the exporters do not answer:
test_hardening's firewall tests cover every forwarded port, 9100 included."""
from __future__ import annotations

import json
import sys
import time

import pytest

from appliance import monitoring
from appliance.credentials import TLS_ROLES
from appliance.wait import Timeout, retry
from tests.conftest import SHARED_NODES
from tests.vm.mail import FILTERS, build_status, new_tokens, queued, send, wait_in_mailboxes

pytestmark = [pytest.mark.vm, pytest.mark.xdist_group("vm")]

INTERVAL = "5s"  # the queue's alert window: 20 of them


def api(cluster, path: str) -> dict:
    """Prometheus's HTTP API, asked from inside the namespace it runs in."""
    fetch = ("import sys, urllib.request\n"
             "print(urllib.request.urlopen(f'http://{sys.argv[1]}:9090{sys.argv[2]}', timeout=10).read().decode())")
    return json.loads(cluster.internet.exec(sys.executable, "-c", fetch, cluster.internet.ip, path).stdout)["data"]


def query(cluster, expr: str) -> dict[tuple, float]:
    """An instant query's result: the value of each series, by its labels (name, job and
    instance left out)."""
    from urllib.parse import quote

    return {tuple(sorted((k, v) for k, v in r["metric"].items() if k not in ("__name__", "job", "instance"))):
            float(r["value"][1])
            for r in api(cluster, f"/api/v1/query?query={quote(expr)}")["result"]}


def firing(cluster) -> list[tuple[str, str | None]]:
    return sorted((a["labels"]["alertname"], a["labels"].get("node")) for a in api(cluster, "/api/v1/alerts")["alerts"]
                  if a["state"] == "firing")


@pytest.fixture(scope="module")
def prometheus(mail_cluster, profiles, tmp_path_factory):
    cluster = mail_cluster
    for name in SHARED_NODES:
        cluster[name].wait_for_boot()
    d = tmp_path_factory.mktemp("prometheus")
    (d / "prometheus.yml").write_text(monitoring.scrape_config(cluster.site, profiles, INTERVAL))
    (d / "mailcluster-rules.yml").write_text(monitoring.alert_rules(INTERVAL))
    process = cluster.internet.spawn(
        "prometheus", "prometheus", f"--config.file={d / 'prometheus.yml'}",
        f"--storage.tsdb.path={d / 'tsdb'}", f"--web.listen-address={cluster.internet.ip}:9090")
    yield cluster
    cluster.internet.end(process)


def test_prometheus_scrapes_every_node_and_raises_the_alert_for_one_that_is_down(prometheus):
    """Every booted node's exporter and fe1's HAProxy answer (up, and the node's own
    figures); store2, in the site but not booted, is down, and the alert for it fires."""
    cluster = prometheus
    expected = {**{("node", n): "1" for n in SHARED_NODES}, ("node", "store2"): "0", ("haproxy", "fe1"): "1",
                ("dovecot", "store1"): "1", ("dovecot", "store2"): "0"}

    def up(last: bool) -> dict | None:
        try:
            return {(r["metric"]["job"], r["metric"]["node"]): r["value"][1]
                    for r in api(cluster, "/api/v1/query?query=up")["result"]}
        except RuntimeError:
            return None  # still starting

    try:
        retry(up, timeout=180, interval=2, until=lambda got: got == expected)
    except Timeout:
        raise AssertionError(f"up: {up(True)}; expected {expected}\n{cluster.internet.logs()}") from None
    # The figures are each node's own.
    names = {r["metric"]["node"]: r["metric"]["nodename"]
             for r in api(cluster, "/api/v1/query?query=node_uname_info")["result"]}
    assert names == {n: n for n in SHARED_NODES}
    try:
        alerts = retry(lambda last: firing(cluster), timeout=180, interval=5,
                       until=lambda a: ("MailclusterNodeDown", "store2") in a)
    except Timeout:
        raise AssertionError(f"firing: {firing(cluster)}\n{cluster.internet.logs()}") from None
    assert alerts == [("MailclusterNodeDown", "store2")], alerts  # and nothing else


def test_the_nodes_own_figures_key_membership_and_certificates(prometheus):
    """What the product's scripts tell Prometheus (the textfile collector): store1's store
    is open, every node counts the same members, and each node that terminates mail's TLS
    says when its certificate expires."""
    cluster = prometheus
    key = retry(lambda last: query(cluster, "mailcluster_mailstore_key_mounted"), timeout=60, interval=5,
                until=lambda got: got)
    assert key == {(("node", "store1"), ("role", "mailstore")): 1}
    # Every node's files are in a form the exporter reads.
    errors = query(cluster, "node_textfile_scrape_error")
    assert {dict(labels)["node"] for labels in errors} == set(SHARED_NODES) and set(errors.values()) == {0}, errors
    members = query(cluster, "mailcluster_members")
    views: dict[tuple, dict[str, float]] = {}
    for labels, value in members.items():
        d = dict(labels)
        views.setdefault((d["member_role"], d["state"]), {})[d["node"]] = value
    assert set(views) == {(r, s) for r in cluster.site.roles for s in ("active", "standby")}
    for (role, state), seen in views.items():
        assert set(seen) == set(SHARED_NODES) and len(set(seen.values())) == 1, (role, state, seen)
    assert views[("mailstore", "active")]["fe1"] >= 1 and views[("filter", "active")]["fe1"] >= 2
    certs = query(cluster, "mailcluster_certificate_expiry_timestamp_seconds")
    tls_nodes = {n for n in SHARED_NODES if cluster.site.node(n).role in TLS_ROLES}
    assert tls_nodes <= {dict(labels)["node"] for labels in certs}, certs
    assert all(expiry > time.time() + 14 * 86400 for expiry in certs.values()), certs
    # Unit states: the ones each role enables (its daemons, active), not the whole system's.
    active: dict[str, set[str]] = {}
    for labels in query(cluster, 'node_systemd_unit_state{state="active"} == 1'):
        active.setdefault(dict(labels)["node"], set()).add(dict(labels)["name"])
    assert {"rspamd.service", "redis-server.service", "postfix.service"} <= active["filter1"], active
    assert "haproxy.service" in active["fe1"] and "dovecot.service" in active["store1"], active
    assert not any("systemd-journald.service" in units for units in active.values()), active


def test_a_stopped_mailstores_growing_queue_raises_the_alert_and_drains_when_it_returns(prometheus):
    """store1's Postfix stopped: mail for its users keeps arriving at the frontend, the
    filters spool it, their queues grow and the alert fires; once store1 is back, the
    mail arrives and the figures say the queues are empty again."""
    cluster = prometheus
    store = cluster["store1"]
    deferred = 'mailcluster_postfix_queue_messages{queue="deferred"}'
    delivered = 'sum(dovecot_mail_deliveries_total{node="store1"})'
    deliveries_before = query(cluster, delivered)
    sent: list[str] = []
    started = time.time()
    store.succeed("systemctl stop postfix.service")
    try:
        def growing(last: bool) -> list:
            sent.extend(send(cluster, new_tokens(1)))  # one more message at every look
            return firing(cluster)

        def doing() -> str:
            """(A filter whose exporter stopped answering was seen twice: what each was doing,
            and how long the scrapes took.)"""
            return f"slowest scrapes: {query(cluster, 'max_over_time(scrape_duration_seconds[10m])')}\n" + "\n".join(
                f"--- {f} ---\n" + cluster[f].execute(
                    "uptime; top -bn1 -o %CPU | head -15; systemctl --failed --no-legend;"
                    " journalctl -b --no-pager -o short-monotonic -p warning | tail -25;"
                    " journalctl -b --no-pager -o short-monotonic -u prometheus-node-exporter -u rspamd | tail -15",
                    timeout=120)[1] for f in FILTERS)

        try:
            alerts = retry(growing, timeout=480, interval=10,
                           until=lambda a: any(name == "MailclusterQueueGrowing" for name, _ in a))
        except Timeout:
            raise AssertionError(f"firing: {firing(cluster)}; deferred: {query(cluster, deferred)}; "
                                 f"{len(sent)} sent\n{doing()}\n{cluster.internet.logs()}") from None
        grown = {node for name, node in alerts if name == "MailclusterQueueGrowing"}
        assert grown <= set(FILTERS), alerts
        # The figures behind it: the filters hold what was sent, since the first of it.
        oldest = query(cluster, 'mailcluster_postfix_queue_oldest_arrival_timestamp_seconds{queue="deferred"}')
        assert {dict(labels)["node"] for labels in oldest} >= grown
        held = sum(v for labels, v in query(cluster, deferred).items() if dict(labels)["node"] in FILTERS)
        assert 2 <= held <= len(sent), (held, len(sent))
        # ./build.py status, from the admin network, shows each filter's queue as Postfix
        # itself lists it (once the node has sampled it again: no mail comes in now), and
        # says store2 is down.
        try:
            shown, code = retry(lambda last: build_status(cluster), timeout=120, interval=10,
                                until=lambda r: all(sum(r[0]["nodes"][f].get("queue", {}).values()) == queued(cluster[f])
                                                    for f in FILTERS))
        except Timeout as e:
            raise AssertionError(f"status: {e.last}; postqueue: {[queued(cluster[f]) for f in FILTERS]}\n"
                                 f"{doing()}") from None
        assert code == 1 and shown["nodes"]["store2"]["up"] is False
        assert any(a.startswith("store2 (mailstore): its exporter") for a in shown["attention"]), shown["attention"]
        for f in grown:
            assert 0 < shown["nodes"][f]["oldest_deferred_seconds"] < time.time() - started + 60, shown["nodes"][f]
        assert shown["nodes"]["store1"]["store"] == "mounted" and shown["nodes"]["fe1"]["backends"]
    finally:
        store.succeed("systemctl start postfix.service")
    wait_in_mailboxes(cluster, sent, timeout=420)
    # Dovecot counted the deliveries (its own metrics, LMTP's mail_delivery_finished).
    before = sum(deliveries_before.values())
    try:
        retry(lambda last: sum(query(cluster, delivered).values()), timeout=60, interval=5,
              until=lambda n: n >= before + len(sent))
    except Timeout as e:
        raise AssertionError(f"Dovecot counted {e.last} deliveries, {before} before {len(sent)} more") from None

    def queue_figures(last: bool) -> dict:
        return {dict(labels)["node"]: v for labels, v in
                query(cluster, 'sum by (node) (mailcluster_postfix_queue_messages)').items()}

    postfix_nodes = {"filter1", "filter2", "store1"}
    try:
        retry(queue_figures, timeout=180, interval=5, until=lambda q: set(q) == postfix_nodes and not any(q.values()))
    except Timeout as e:
        raise AssertionError(f"queue figures after delivery: {e.last}\n" + "\n".join(
            f"{n}: " + cluster[n].execute("ls -l /var/lib/mailcluster/metrics; cat /var/lib/mailcluster/metrics/queue.prom;"
                                          " journalctl -b --no-pager -u mailcluster-queue-metrics | tail -20")[1]
            for n in sorted(postfix_nodes))) from None
