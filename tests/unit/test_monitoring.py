"""./build.py monitoring: a scrape configuration Prometheus's own checker accepts, with
every node's exporter where the profiles put it, and alert rules that fire on what
they name (Prometheus's rule tests, promtool). (A real Prometheus scraping a booted
cluster: tests/vm/test_metrics.py.)"""
import shutil
import subprocess

import yaml

from appliance.paths import HOST_PATH
from appliance.plan import Plan
from appliance.profiles import ProfileSet
from appliance.site import load_site
from appliance import paths
from tests.tools import build_py

PROMTOOL = shutil.which("promtool", path=HOST_PATH) or "promtool"


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
    # Both are for the admin network only, where the configuration says Prometheus runs.
    assert {"admin"} == set(stats.allow) == set(Plan.of(profiles, site, "filter").ports["node-metrics"].allow)


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
