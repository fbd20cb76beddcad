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
    "dovecot-metrics": "dovecot",  # Dovecot's stats service, the mailstores
}

# How many scrape intervals the queue's growth is judged over (30 s: ten minutes). The
# nodes sample their queue every 30 s (mailcluster-queue-metrics.timer).
QUEUE_WINDOW = 20

DEFERRED = 'mailcluster_postfix_queue_messages{queue="deferred"}'
CORRUPT = 'mailcluster_postfix_queue_messages{queue="corrupt"}'

# What needs attention, for the alert rules and ./build.py status alike.
DISK_FULL = 0.85  # of a disk's file systems (DISK_FSTYPES) used
DISK_FSTYPES = "ext4|xfs|btrfs"
MAIL_DELAYED = 3600  # seconds a deferred message may wait
BACKUP_STALE = 2  # times the backup schedule's interval since the last completed backup
CERT_DAYS = 14  # days before a certificate expires (ACME renews at 30)

# name, expression, for, severity, summary. {{ $labels.node }} and {{ $labels.role }} are
# the target labels this configuration gives each node. {half} and {window} are the
# queue's window and its half (QUEUE_WINDOW scrape intervals). The mailcluster_* series
# are the nodes' own (members.sh's METRICS, through the node exporter).
RULES = [
    ("MailclusterNodeDown", 'up{job="node"} == 0', "1m", "critical",
     "{{ $labels.node }} ({{ $labels.role }}) does not answer Prometheus"),
    ("MailclusterFrontendBackendDown", 'haproxy_server_status{state="DOWN"} == 1', "1m", "warning",
     "{{ $labels.node }}: HAProxy has taken {{ $labels.server }} out of {{ $labels.proxy }}"),
    ("MailclusterDiskFilling",
     f'1 - node_filesystem_avail_bytes{{fstype=~"{DISK_FSTYPES}"}} / node_filesystem_size_bytes{{fstype=~"{DISK_FSTYPES}"}}'
     f' > {DISK_FULL}', "10m", "warning",
     f"{{{{ $labels.node }}}}: {{{{ $labels.mountpoint }}}} is more than {DISK_FULL:.0%} full".replace("%", " %")),
    # Grew in each half of the window: mail keeps coming and does not leave (a mailstore
    # or the Internet unreachable), not one message waiting for a retry.
    ("MailclusterQueueGrowing",
     f"{DEFERRED} > {DEFERRED} offset {{half}} and {DEFERRED} offset {{half}} > {DEFERRED} offset {{window}}", "0s",
     "warning", "{{ $labels.node }}: {{ $value }} messages deferred, and more keep coming"),
    ("MailclusterMailDelayed",
     f'time() - mailcluster_postfix_queue_oldest_arrival_timestamp_seconds{{queue="deferred"}} > {MAIL_DELAYED}', "0s",
     "warning",
     "{{ $labels.node }}: a deferred message has waited {{ $value | humanizeDuration }}"),
    # Postfix's own corrupt queue, where the nodes also set aside the queue files a power
    # cut left unreadable (crypt.sh): mail that will never leave, for someone to look at.
    ("MailclusterQueueCorrupt", f"{CORRUPT} > 0", "0s", "warning",
     "{{ $labels.node }}: {{ $value }} queue files could not be read and wait in Postfix's corrupt queue"),
    ("MailclusterMailstoreLocked", "mailcluster_mailstore_key_mounted == 0", "1m", "critical",
     "{{ $labels.node }}: the mail store is locked (no key, or the wrong one): its users get no mail"),
    ("MailclusterBackupStale",
     "time() - mailcluster_backup_last_success_timestamp_seconds"
     f" > on(instance) group_left {BACKUP_STALE} * mailcluster_backup_interval_seconds", "0s", "warning",
     "{{ $labels.node }}: the last backup to {{ $labels.backup }} completed {{ $value | humanizeDuration }} ago,"
     f" over {BACKUP_STALE} times its schedule"),
    ("MailclusterCertificateExpiring", f"mailcluster_certificate_expiry_timestamp_seconds - time() < {CERT_DAYS} * 86400", "0s",
     "warning", "{{ $labels.node }}: its TLS certificate ({{ $labels.source }}) expires in"
     " {{ $value | humanizeDuration }}"),
    # Every node that answers sees the same nodes (an announcement that missed one shows).
    ("MailclusterMembershipDisagrees",
     'count by (member_role, state) (count_values by (member_role, state) ("nodes", mailcluster_members)) > 1', "{window}",
     "warning", "the nodes disagree on how many {{ $labels.state }} {{ $labels.member_role }} nodes the cluster has"),
]


def _seconds(duration: str) -> int:
    return int(duration[:-1]) * {"s": 1, "m": 60, "h": 3600}[duration[-1]]


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


def alert_rules(interval: str = "30s") -> str:
    """The alert rules file the scrape configuration names, for Prometheus scraping every
    INTERVAL (NUMBER s|m|h)."""
    window = _seconds(interval) * QUEUE_WINDOW

    def timed(text: str) -> str:
        return text.replace("{window}", f"{window}s").replace("{half}", f"{window // 2}s")

    rules = [{"alert": name, "expr": timed(expr), "for": timed(duration),
              "labels": {"severity": severity}, "annotations": {"summary": summary}}
             for name, expr, duration, severity, summary in RULES]
    return ("# Alert rules for the mail cluster (./build.py monitoring --rules).\n"
            + yaml.safe_dump({"groups": [{"name": "mailcluster", "rules": rules}]}, sort_keys=False))
