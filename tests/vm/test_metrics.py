"""A real Prometheus, with the configuration and rules ./build.py monitoring prints,
scraping the booted cluster from the admin network (the test Internet's namespace on
the cluster's switch is inside it). From outside, the exporters do not answer:
test_hardening's firewall tests cover every forwarded port, 9100 included."""
from __future__ import annotations

import json
import sys

import pytest

from appliance import monitoring
from appliance.wait import Timeout, retry
from tests.conftest import SHARED_NODES

pytestmark = [pytest.mark.vm, pytest.mark.xdist_group("vm")]


def api(cluster, path: str) -> dict:
    """Prometheus's HTTP API, asked from inside the namespace it runs in."""
    fetch = ("import sys, urllib.request\n"
             "print(urllib.request.urlopen(f'http://{sys.argv[1]}:9090{sys.argv[2]}', timeout=10).read().decode())")
    return json.loads(cluster.internet.exec(sys.executable, "-c", fetch, cluster.internet.ip, path).stdout)["data"]


def test_prometheus_scrapes_every_node_and_raises_the_alert_for_one_that_is_down(mail_cluster, profiles, tmp_path):
    """Every booted node's exporter and fe1's HAProxy answer (up, and the node's own
    figures); store2, in the site but not booted, is down, and the alert for it fires."""
    cluster = mail_cluster
    for name in SHARED_NODES:
        cluster[name].wait_for_boot()
    (tmp_path / "prometheus.yml").write_text(monitoring.scrape_config(cluster.site, profiles, "5s"))
    (tmp_path / "mailcluster-rules.yml").write_text(monitoring.alert_rules())
    prometheus = cluster.internet.spawn(
        "prometheus", "prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address={cluster.internet.ip}:9090")
    try:
        expected = {**{("node", n): "1" for n in SHARED_NODES}, ("node", "store2"): "0", ("haproxy", "fe1"): "1"}

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

        def firing(last: bool) -> list:
            return [(a["labels"]["alertname"], a["labels"].get("node")) for a in api(cluster, "/api/v1/alerts")["alerts"]
                    if a["state"] == "firing"]

        try:
            alerts = retry(firing, timeout=180, interval=5, until=lambda a: ("MailclusterNodeDown", "store2") in a)
        except Timeout:
            raise AssertionError(f"firing: {firing(True)}\n{cluster.internet.logs()}") from None
        assert alerts == [("MailclusterNodeDown", "store2")], alerts  # and nothing else
    finally:
        cluster.internet.end(prometheus)
