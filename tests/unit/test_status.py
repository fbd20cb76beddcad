"""./build.py status's judgement on what the endpoints answered: the figures it shows and
what it says needs attention, by the alert rules' thresholds. (Against a booted cluster,
from its admin network: tests/vm/test_metrics.py.)"""
import json

from appliance import monitoring, paths, status
from appliance.profiles import ProfileSet
from appliance.site import load_site

NOW = 1_800_000_000.0
DISK = ('node_filesystem_size_bytes{{device="/dev/vda2",fstype="ext4",mountpoint="/"}} 1000\n'
        'node_filesystem_avail_bytes{{device="/dev/vda2",fstype="ext4",mountpoint="/"}} {avail}\n'
        'node_filesystem_size_bytes{{device="tmpfs",fstype="tmpfs",mountpoint="/run"}} 1000\n'
        'node_filesystem_avail_bytes{{device="tmpfs",fstype="tmpfs",mountpoint="/run"}} 0\n')
MEMBERS = ('mailcluster_members{{member_role="filter",state="active"}} {filters}\n'
           'mailcluster_members{{member_role="mailstore",state="active"}} 1\n')


def node(avail=500, filters=2, extra="") -> str:
    return ('# HELP node_os_info x\nnode_os_info{id="debian",pretty_name="Debian GNU/Linux 13 (trixie)",'
            'version_id="13"} 1\n' + DISK.format(avail=avail) + MEMBERS.format(filters=filters) + extra)


def queue(deferred: int, oldest: float | None, corrupt: int = 0) -> str:
    counts = {"incoming": 0, "active": 0, "deferred": deferred, "hold": 0, "corrupt": corrupt}
    text = "".join(f'mailcluster_postfix_queue_messages{{queue="{q}"}} {n}\n' for q, n in counts.items())
    if oldest is not None:
        text += f'mailcluster_postfix_queue_oldest_arrival_timestamp_seconds{{queue="deferred"}} {oldest}\n'
    return text


def store(key=1, backup_age=600, cert_days=60) -> str:
    return (f"mailcluster_mailstore_key_mounted {key}\n"
            "mailcluster_backup_interval_seconds 3600\n"
            f'mailcluster_backup_last_success_timestamp_seconds{{backup="store2"}} {NOW - backup_age}\n'
            'mailcluster_backup_size_bytes{backup="store2"} 123456\n'
            'mailcluster_backup_snapshots{backup="store2"} 7\n'
            f'mailcluster_certificate_expiry_timestamp_seconds{{source="acme"}} {NOW + cert_days * 86400}\n')


def haproxy(filter2: str) -> str:
    return "".join(f'haproxy_server_status{{proxy="filters_25",server="{s}",state="{state}"}} '
                   f'{1 if state == (filter2 if s == "filter2" else "UP") else 0}\n'
                   for s in ("filter1", "filter2") for state in ("UP", "DOWN", "MAINT"))


def collect(answers: dict[tuple[str, str], str | None]) -> dict:
    """status.collect with each (node, job)'s endpoint answering its text (None: no answer)."""
    profiles = ProfileSet.load()
    site = load_site(paths.EXAMPLE_SITE, profiles.roles)
    by_address = {address: (name, job) for job, name, _, address in monitoring.targets(site, profiles)}
    assert set(answers) == set(by_address.values())

    def read(address: str) -> str:
        text = answers[by_address[address]]
        if text is None:
            raise ConnectionRefusedError(111, "Connection refused")
        return text

    result = status.collect(site, profiles, read, now=NOW)
    json.dumps(result)  # what --json prints
    return result


def healthy() -> dict:
    return {("fe1", "node"): node(), ("fe1", "haproxy"): haproxy("UP"),
            ("filter1", "node"): node(extra=queue(0, None)), ("filter2", "node"): node(extra=queue(0, None)),
            ("store1", "node"): node(extra=queue(0, None) + store()), ("store1", "dovecot"): "dovecot_x_total 1\n",
            ("store2", "node"): node(extra=queue(0, None)), ("store2", "dovecot"): "dovecot_x_total 1\n"}


def test_a_healthy_cluster_needs_nothing_and_shows_its_figures():
    result = collect(healthy())
    assert result["attention"] == []
    s1 = result["nodes"]["store1"]
    assert s1["up"] and s1["store"] == "mounted" and s1["image"] == "13"
    assert s1["backup"] == {"to": "store2", "age_seconds": 600, "size_bytes": 123456, "snapshots": 7}
    assert s1["certificate"] == {"source": "acme", "days_left": 60}
    assert s1["disk_used_percent"] == {"/": 50}  # tmpfs is not a disk
    assert result["nodes"]["fe1"]["backends"] == {"filters_25/filter1": "UP", "filters_25/filter2": "UP"}
    assert status.table(result).endswith("\nall well\n")


def test_each_problem_is_named_with_its_node():
    answers = healthy()
    answers[("store2", "node")] = None
    answers[("store2", "dovecot")] = None
    answers[("fe1", "haproxy")] = haproxy("DOWN")
    answers[("filter1", "node")] = node(avail=100, filters=1, extra=queue(3, NOW - 2 * 3600))
    answers[("store1", "node")] = node(extra=queue(0, None) + store(key=0, backup_age=3 * 3600, cert_days=10))
    answers[("filter2", "node")] = node(extra=queue(0, None, corrupt=2))
    result = collect(answers)
    f1 = result["nodes"]["filter1"]
    assert f1["queue"]["deferred"] == 3 and f1["oldest_deferred_seconds"] == 7200
    assert result["nodes"]["store2"]["up"] is False
    said = result["attention"]
    expected = [
        "filter1: a deferred message has waited 120 minutes",
        "filter1: / is 90 % full",
        "fe1: HAProxy has taken filters_25/filter2 out",
        "store1: the mail store is locked (no key, or the wrong one)",
        "store1: the last backup to store2 completed 3 h ago, over 2 times its schedule",
        "store1: its TLS certificate expires in 10 days",
        "filter2: 2 queue files could not be read and wait in Postfix's corrupt queue",
    ]
    for line in expected:
        assert line in said, said
    assert any(a.startswith("store2 (mailstore): its exporter at ") and "does not answer" in a for a in said), said
    disagree = [a for a in said if a.startswith("the nodes disagree on the membership")]
    assert len(disagree) == 1 and "filter1: filter/active 1, mailstore/active 1" in disagree[0], said
    assert len(said) == len(expected) + 3  # store2's two endpoints, the membership
    table = status.table(result)
    assert "store2   mailstore  DOWN" in table and "attention: store1: the mail store is locked" in table


def test_label_values_are_read_as_the_text_format_escapes_them_and_carry_no_control_characters():
    samples = status.parse('m{a="x\\"y",b="c\\\\d"} 2.5\n# HELP m x\nbad line\nn 1e3 1700000000000\n'
                           'o{a="\x1b[2J\\nroot"} 1\n')
    assert samples == [("m", {"a": 'x"y', "b": "c\\d"}, 2.5), ("n", {}, 1000.0), ("o", {"a": "?[2J?root"}, 1.0)]
