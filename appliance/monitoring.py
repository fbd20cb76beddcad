"""What a site's Prometheus needs (./build.py monitoring): a scrape configuration with
every node's exporters, and alert rules for what an operator must hear about.

Every endpoint answers the admin network only (the firewall: each port's `allow` in
the profiles), so Prometheus runs there. The ports come from the plan: a profile names
a metrics port once, and this module only says which job scrapes it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from .profiles import ProfileSet
    from .site import Site

# A port name in the profiles -> the job that scrapes it (both serve /metrics).
JOBS = {
    "node-metrics": "node",  # prometheus-node-exporter, every node
    "stats": "haproxy",  # HAProxy's own exporter, the frontends
}

# name, expression, for, severity, summary. {{ $labels.node }} and {{ $labels.role }} are
# the target labels this configuration gives each node.
RULES = [
    ("MailclusterNodeDown", 'up{job="node"} == 0', "1m", "critical",
     "{{ $labels.node }} ({{ $labels.role }}) does not answer Prometheus"),
    ("MailclusterFrontendBackendDown", 'haproxy_server_status{state="DOWN"} == 1', "1m", "warning",
     "{{ $labels.node }}: HAProxy has taken {{ $labels.server }} out of {{ $labels.proxy }}"),
    ("MailclusterDiskFilling",
     '1 - node_filesystem_avail_bytes{fstype=~"ext4|xfs|btrfs"} / node_filesystem_size_bytes{fstype=~"ext4|xfs|btrfs"}'
     ' > 0.85', "10m", "warning",
     "{{ $labels.node }}: {{ $labels.mountpoint }} is more than 85 % full"),
]


def targets(site: "Site", profiles: "ProfileSet") -> list[tuple[str, str, str, str]]:
    """(job, node, role, ADDRESS:PORT) for every metrics endpoint of the site."""
    from .plan import role_ports

    out = []
    for role in site.roles:
        ports = role_ports(profiles.compose(role), site)
        for node in site.nodes_with_role(role):
            out += [(job, node.name, role, f"{node.address}:{ports[name].port}")
                    for name, job in JOBS.items() if name in ports]
    return out


def scrape_config(site: "Site", profiles: "ProfileSet", interval: str = "30s",
                  rules_file: str = "mailcluster-rules.yml") -> str:
    """prometheus.yml for the site: one job per kind of exporter, each target labelled
    with its node and role."""
    jobs: dict[str, list[dict]] = {}
    for job, node, role, address in targets(site, profiles):
        jobs.setdefault(job, []).append({"targets": [address], "labels": {"node": node, "role": role}})
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [rules_file],
        "scrape_configs": [{"job_name": job, "static_configs": static} for job, static in jobs.items()],
    }
    head = (f"# Prometheus scrape configuration for site {site.name} (./build.py monitoring).\n"
            f"# Run Prometheus on the admin network ({site.network.admin_network}): nothing else is let in.\n")
    return head + yaml.safe_dump(config, sort_keys=False)


def alert_rules() -> str:
    """The alert rules file the scrape configuration names."""
    rules = [{"alert": name, "expr": expr, "for": duration, "labels": {"severity": severity},
              "annotations": {"summary": summary}} for name, expr, duration, severity, summary in RULES]
    return ("# Alert rules for the mail cluster (./build.py monitoring --rules).\n"
            + yaml.safe_dump({"groups": [{"name": "mailcluster", "rules": rules}]}, sort_keys=False))
