"""./build.py monitoring: a scrape configuration Prometheus's own checker accepts, with
every node's exporter where the profiles put it, and alert rules that fire on what
they name (Prometheus's rule tests, promtool). (A real Prometheus scraping a booted
cluster: tests/vm/test_metrics.py.)"""
import subprocess

import yaml

from appliance.plan import Plan
from appliance.profiles import ProfileSet
from appliance.site import load_site
from appliance import paths
from tests.tools import PROMTOOL, build_py

def printed(tmp_path) -> tuple[dict, str]:
    config = build_py("monitoring", "--interval", "15s")
    rules = build_py("monitoring", "--rules")
    assert config.returncode == 0 and rules.returncode == 0, config.stderr + rules.stderr
    (tmp_path / "prometheus.yml").write_text(config.stdout)
    (tmp_path / "mailcluster-rules.yml").write_text(rules.stdout)
    return yaml.safe_load(config.stdout), rules.stdout


def test_the_configuration_scrapes_every_node_where_its_exporter_listens(tmp_path):
    config, _ = printed(tmp_path)
    r = subprocess.run([PROMTOOL, "check", "config", "prometheus.yml"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 rule files found" in r.stdout + r.stderr
    assert config["global"]["scrape_interval"] == "15s"
    jobs = {job["job_name"]: {(s["labels"]["node"], s["labels"]["role"]): s["targets"]
                              for s in job["static_configs"]} for job in config["scrape_configs"]}
    profiles = ProfileSet.load()
    site = load_site(paths.EXAMPLE_SITE, profiles.roles)
    node_port = {r: Plan.of(profiles, site, r).ports["node-metrics"].port for r in site.roles}
    assert jobs["node"] == {(n.name, n.role): [f"{n.address}:{node_port[n.role]}"] for n in site.nodes}
    stats = Plan.of(profiles, site, "frontend").ports["stats"]
    assert jobs["haproxy"] == {("fe1", "frontend"): [f"{site.node('fe1').address}:{stats.port}"]}
    dovecot = Plan.of(profiles, site, "mailstore").ports["dovecot-metrics"]
    assert jobs["dovecot"] == {(n.name, n.role): [f"{n.address}:{dovecot.port}"] for n in site.nodes
                               if n.role == "mailstore"}
    # All are for the admin network only, where the configuration says Prometheus runs.
    assert ({"admin"} == set(stats.allow) == set(dovecot.allow)
            == set(Plan.of(profiles, site, "filter").ports["node-metrics"].allow))


def test_the_alert_rules_fire_for_a_node_down_a_backend_down_and_a_full_disk(tmp_path):
    printed(tmp_path)
    (tmp_path / "tests.yml").write_text(yaml.safe_dump({
        "rule_files": ["mailcluster-rules.yml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                {"series": 'up{job="node",node="store2",role="mailstore"}', "values": "1 0 0 0"},
                {"series": 'up{job="node",node="store1",role="mailstore"}', "values": "1 1 1 1"},
                {"series": 'haproxy_server_status{node="fe1",proxy="filters_25",server="filter2",state="DOWN"}',
                 "values": "0 1 1 1"},
                {"series": 'node_filesystem_avail_bytes{node="store1",fstype="ext4",mountpoint="/srv/mail"}',
                 "values": "50+0x20"},
                {"series": 'node_filesystem_size_bytes{node="store1",fstype="ext4",mountpoint="/srv/mail"}',
                 "values": "1000+0x20"},
                {"series": 'node_filesystem_avail_bytes{node="store1",fstype="tmpfs",mountpoint="/run"}',
                 "values": "0+0x20"},
                {"series": 'node_filesystem_size_bytes{node="store1",fstype="tmpfs",mountpoint="/run"}',
                 "values": "1000+0x20"},
            ],
            "alert_rule_test": [
                {"eval_time": "3m", "alertname": "MailclusterNodeDown", "exp_alerts": [{
                    "exp_labels": {"severity": "critical", "job": "node", "node": "store2", "role": "mailstore"},
                    "exp_annotations": {"summary": "store2 (mailstore) does not answer Prometheus"}}]},
                {"eval_time": "3m", "alertname": "MailclusterFrontendBackendDown", "exp_alerts": [{
                    "exp_labels": {"severity": "warning", "node": "fe1", "proxy": "filters_25", "server": "filter2",
                                   "state": "DOWN"},
                    "exp_annotations": {"summary": "fe1: HAProxy has taken filter2 out of filters_25"}}]},
                # 95 % full for 15 minutes; the full tmpfs is not a disk.
                {"eval_time": "15m", "alertname": "MailclusterDiskFilling", "exp_alerts": [{
                    "exp_labels": {"severity": "warning", "node": "store1", "fstype": "ext4",
                                   "mountpoint": "/srv/mail"},
                    "exp_annotations": {"summary": "store1: /srv/mail is more than 85 % full"}}]},
                {"eval_time": "5m", "alertname": "MailclusterDiskFilling", "exp_alerts": []},  # not yet 10 minutes
            ]}]}))
    r = subprocess.run([PROMTOOL, "test", "rules", "tests.yml"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_bad_interval_is_refused():
    r = build_py("monitoring", "--interval", "5 s\nscrape_configs: []")
    assert r.returncode != 0 and "--interval" in r.stderr and "e.g. --interval 15s" in r.stderr


def rule_test(tmp_path, interval: str, series: dict[str, str], alerts: list[tuple]) -> None:
    """promtool's rule test: SERIES (name{labels} -> values) every INTERVAL, and for each
    (eval_time, alertname, [(labels, summary)...]) exactly those alerts firing."""
    printed(tmp_path)
    (tmp_path / "tests.yml").write_text(yaml.safe_dump({
        "rule_files": ["mailcluster-rules.yml"], "evaluation_interval": "1m",
        "tests": [{"interval": interval, "input_series": [{"series": s, "values": v} for s, v in series.items()],
                   "alert_rule_test": [{"eval_time": at, "alertname": name, "exp_alerts": [
                       {"exp_labels": labels, "exp_annotations": {"summary": summary}} for labels, summary in exp]}
                       for at, name, exp in alerts]}]}))
    r = subprocess.run([PROMTOOL, "test", "rules", "tests.yml"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_growing_queue_and_a_split_view_raise_alerts_and_one_deferred_message_does_not(tmp_path):
    """Scraped every 30 s, the queue's window is ten minutes: growth in both of its halves."""
    q = 'mailcluster_postfix_queue_messages{job="node",node="%s",queue="deferred"}'
    m = 'mailcluster_members{job="node",node="%s",member_role="filter",state="active"}'
    rule_test(tmp_path, "1m", {
        q % "filter1": "0 0 1+1x20",   # a stopped mailstore: every minute one more
        q % "filter2": "0 0 1x20",     # one message waiting for its retry
        # store1 and filter2 see two active filters, filter1 from minute 5 only one
        m % "store1": "2x30", m % "filter2": "2x30", m % "filter1": "2x4 1x25",
    }, [
        ("8m", "MailclusterQueueGrowing", []),  # not yet a whole window
        ("13m", "MailclusterQueueGrowing", [
            ({"severity": "warning", "job": "node", "node": "filter1", "queue": "deferred"},
             "filter1: 12 messages deferred, and more keep coming")]),
        ("14m", "MailclusterMembershipDisagrees", []),  # for ten minutes
        ("16m", "MailclusterMembershipDisagrees", [
            ({"severity": "warning", "member_role": "filter", "state": "active"},
             "the nodes disagree on how many active filter nodes the cluster has")]),
    ])


def test_alerts_for_a_locked_store_a_stale_backup_an_expiring_certificate_delayed_mail_and_a_corrupt_queue(tmp_path):
    node = {"job": "node", "instance": "10.77.0.31:9100", "node": "store1", "role": "mailstore"}

    def s(name: str, **labels) -> str:
        return name + "{" + ",".join(f'{k}="{v}"' for k, v in {**node, **labels}.items()) + "}"

    day = 86400
    rule_test(tmp_path, "1h", {
        s("mailcluster_mailstore_key_mounted"): "1 0x100",
        # an hourly backup, last done at 0 (the test's epoch)
        s("mailcluster_backup_interval_seconds"): "3600x100",
        s("mailcluster_backup_last_success_timestamp_seconds", backup="store2"): "0x100",
        # expires on day 15
        s("mailcluster_certificate_expiry_timestamp_seconds", source="acme"): f"{15 * day}x100",
        s("mailcluster_postfix_queue_oldest_arrival_timestamp_seconds", queue="deferred"): "0x100",
        s("mailcluster_postfix_queue_messages", queue="corrupt"): "0 0 1x100",
    }, [
        # (sampled hourly: a sample stays current for five minutes)
        ("2h2m", "MailclusterMailstoreLocked", [
            ({"severity": "critical", **node},
             "store1: the mail store is locked (no key, or the wrong one): its users get no mail")]),
        ("2h", "MailclusterBackupStale", []),  # twice the schedule: not yet over
        ("3h", "MailclusterBackupStale", [
            ({"severity": "warning", **node, "backup": "store2"},
             "store1: the last backup to store2 completed 3h 0m 0s ago, over 2 times its schedule")]),
        ("0", "MailclusterCertificateExpiring", []),
        ("2d", "MailclusterCertificateExpiring", [
            ({"severity": "warning", **node, "source": "acme"}, "store1: its TLS certificate (acme) expires in 13d 0h 0m 0s")]),
        ("1h", "MailclusterQueueCorrupt", []),
        ("2h", "MailclusterQueueCorrupt", [
            ({"severity": "warning", **node, "queue": "corrupt"},
             "store1: 1 queue files could not be read and wait in Postfix's corrupt queue")]),
        ("0", "MailclusterMailDelayed", []),
        ("2h", "MailclusterMailDelayed", [
            ({"severity": "warning", **node, "queue": "deferred"}, "store1: a deferred message has waited 2h 0m 0s")]),
    ])
