"""./build.py status: the cluster at a glance, read from the same endpoints Prometheus
scrapes (./build.py monitoring's targets), so it needs nothing on the nodes but what
already answers the admin network, and judges by the alert rules' thresholds.
"""
from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from . import monitoring as mon

if TYPE_CHECKING:
    from .profiles import ProfileSet
    from .site import Site

Samples = list[tuple[str, dict[str, str], float]]

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?$')
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]|\\n")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> Samples:
    """Prometheus's text format (and OpenMetrics'): (name, labels, value) per sample."""
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if line.startswith("#") or not m:
            continue
        # (what a node says reaches the operator's terminal: no control characters)
        labels = {k: _CONTROL.sub("?", v.replace('\\"', '"').replace("\\\\", "\\"))
                  for k, v in _LABEL.findall(m.group(2) or "")}
        try:
            out.append((m.group(1), labels, float(m.group(3))))
        except ValueError:
            continue
    return out


# Straight to the node: never through a proxy the environment names (the admin network
# is the operator's own, and a proxy would answer for nodes that do not).
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def fetch(address: str, timeout: float) -> str:
    with _OPENER.open(f"http://{address}/metrics", timeout=timeout) as r:
        return r.read(8 << 20).decode(errors="replace")


def _values(samples: Samples, name: str, **match: str) -> list[tuple[dict[str, str], float]]:
    return [(labels, v) for n, labels, v in samples if n == name and all(labels.get(k) == x for k, x in match.items())]


def _one(samples: Samples, name: str, **match: str) -> float | None:
    found = _values(samples, name, **match)
    return found[0][1] if found else None


def node_status(samples: Samples, now: float) -> tuple[dict[str, Any], list[str]]:
    """One answering node's figures, and what about them needs attention."""
    info: dict[str, Any] = {}
    attention: list[str] = []
    os_info = _values(samples, "node_os_info")
    if os_info:
        labels = os_info[0][0]
        info["image"] = labels.get("image_version") or labels.get("version_id") or labels.get("pretty_name")
    key = _one(samples, "mailcluster_mailstore_key_mounted")
    if key is not None:
        info["store"] = "mounted" if key else "locked"
        if not key:
            attention.append("the mail store is locked (no key, or the wrong one)")
    queues = {labels["queue"]: int(v) for labels, v in _values(samples, "mailcluster_postfix_queue_messages")}
    if queues:
        info["queue"] = queues
        if queues.get("corrupt"):
            attention.append(f"{queues['corrupt']} queue files could not be read and wait in Postfix's corrupt queue")
        oldest = _one(samples, "mailcluster_postfix_queue_oldest_arrival_timestamp_seconds", queue="deferred")
        if oldest is not None:
            info["oldest_deferred_seconds"] = int(now - oldest)
            if now - oldest > mon.MAIL_DELAYED:
                attention.append(f"a deferred message has waited {int((now - oldest) // 60)} minutes")
    for labels, done in _values(samples, "mailcluster_backup_last_success_timestamp_seconds"):
        peer = labels.get("backup", "?")
        backup: dict[str, Any] = {"to": peer, "age_seconds": int(now - done)}
        for field, name in (("size_bytes", "mailcluster_backup_size_bytes"), ("snapshots", "mailcluster_backup_snapshots")):
            value = _one(samples, name, backup=peer)
            if value is not None:
                backup[field] = int(value)
        interval = _one(samples, "mailcluster_backup_interval_seconds")
        if interval and now - done > mon.BACKUP_STALE * interval:
            attention.append(f"the last backup to {peer} completed {int((now - done) // 3600)} h ago, "
                             f"over {mon.BACKUP_STALE} times its schedule")
        info["backup"] = backup
    for labels, expiry in _values(samples, "mailcluster_certificate_expiry_timestamp_seconds"):
        info["certificate"] = {"source": labels.get("source"), "days_left": int((expiry - now) // 86400)}
        if expiry - now < mon.CERT_DAYS * 86400:
            attention.append(f"its TLS certificate expires in {int((expiry - now) // 86400)} days")
    disks = {}
    for labels, size in _values(samples, "node_filesystem_size_bytes"):
        if re.fullmatch(mon.DISK_FSTYPES, labels.get("fstype", "")) and size:
            avail = _one(samples, "node_filesystem_avail_bytes", mountpoint=labels["mountpoint"],
                         device=labels.get("device", ""))
            if avail is not None:
                used = 1 - avail / size
                disks[labels["mountpoint"]] = round(100 * used)
                if used > mon.DISK_FULL:
                    attention.append(f"{labels['mountpoint']} is {round(100 * used)} % full")
    info["disk_used_percent"] = disks
    members = {f"{labels['member_role']}/{labels['state']}": int(v) for labels, v in _values(samples, "mailcluster_members")}
    if members:
        info["members"] = members
    return info, attention


def collect(site: "Site", profiles: "ProfileSet", read: Callable[[str], str] | None = None,
            timeout: float = 5.0, now: float | None = None) -> dict[str, Any]:
    """Every node's status, the frontends' view of their backends, and what needs attention."""
    read = read or (lambda address: fetch(address, timeout))
    now = time.time() if now is None else now
    nodes: dict[str, dict[str, Any]] = {}
    attention: list[str] = []
    targets = mon.targets(site, profiles)

    def answer(address: str) -> str | OSError:
        try:
            return read(address)
        except OSError as e:
            return e

    # All at once: a node that is down costs one timeout, not one per endpoint in turn.
    with ThreadPoolExecutor(max_workers=min(16, len(targets) or 1)) as pool:
        answers = list(pool.map(answer, [address for *_, address in targets]))
    for (job, name, role, address), text in zip(targets, answers):
        entry = nodes.setdefault(name, {"role": role, "up": None})
        try:
            if isinstance(text, OSError):
                raise text
            samples = parse(text)
        except OSError as e:
            if job == "node":
                entry["up"] = False
                attention.append(f"{name} ({role}): its exporter at {address} does not answer ({e})")
            else:
                attention.append(f"{name}: {job}'s metrics at {address} do not answer ({e})")
            continue
        if job == "node":
            entry["up"] = True
            info, said = node_status(samples, now)
            entry.update(info)
            attention += [f"{name}: {s}" for s in said]
        elif job == "haproxy":
            servers = {}
            for labels, v in _values(samples, "haproxy_server_status"):
                if v == 1:
                    servers[f"{labels.get('proxy')}/{labels.get('server')}"] = labels.get("state")
            entry["backends"] = servers
            attention += [f"{name}: HAProxy has taken {s} out" for s, state in sorted(servers.items()) if state == "DOWN"]
    views = {name: n["members"] for name, n in nodes.items() if n.get("members")}
    if len({tuple(sorted(v.items())) for v in views.values()}) > 1:
        attention.append("the nodes disagree on the membership: " +
                         "; ".join(f"{n}: {', '.join(f'{k} {c}' for k, c in sorted(v.items()) if c)}"
                                   for n, v in sorted(views.items())))
    return {"nodes": nodes, "attention": attention}


def table(status: dict[str, Any]) -> str:
    """The status as a table for a terminal, then what needs attention."""
    rows = [("NODE", "ROLE", "UP", "IMAGE", "STORE", "QUEUE", "OLDEST", "BACKUP", "CERT", "DISK")]
    for name, n in sorted(status["nodes"].items()):
        queue = n.get("queue")
        backup = n.get("backup")
        rows.append((
            name, n["role"], {True: "up", False: "DOWN", None: "?"}[n["up"]], n.get("image") or "-",
            n.get("store", "-"),
            "-" if queue is None else f"{queue.get('deferred', 0)} deferred/{sum(queue.values())}",
            _age(n.get("oldest_deferred_seconds")),
            "-" if backup is None else f"{_age(backup['age_seconds'])} ago, {backup.get('snapshots', '?')} kept",
            "-" if "certificate" not in n else f"{n['certificate']['days_left']} d",
            " ".join(f"{m} {p}%" for m, p in sorted(n.get("disk_used_percent", {}).items())) or "-"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    for name, n in sorted(status["nodes"].items()):
        for server, state in sorted(n.get("backends", {}).items()):
            lines.append(f"{name}: {server} {state}")
    lines += [""] + ([f"attention: {a}" for a in status["attention"]] or ["all well"])
    return "\n".join(lines) + "\n"


def _age(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
