"""The nodes' own figures for Prometheus, as their scripts write them (the textfile
collector's format, checked by Prometheus's promtool): the queue, the certificate, the
backup schedule. (Backups: test_backup_handlers; the membership: test_members; a real
Prometheus scraping them from a booted cluster: tests/vm/test_metrics.py.)"""
import os
import shutil
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from appliance import paths
from tests.tools import samples, script_lib

QUEUE_METRICS = paths.OVERLAYS / "30-postfix/usr/libexec/mailcluster/queue-metrics"
STORE_LIB = paths.OVERLAYS / "60-mailstore/usr/lib/mailcluster/store.sh"


@pytest.fixture
def spool(tmp_path):
    """A Postfix queue directory, the metrics directory, and a postqueue that answers
    with what the test puts in `showq` (postqueue -j's output: one JSON object a message)."""
    queue = tmp_path / "spool"
    for q in ("maildrop", "incoming", "active", "deferred", "hold", "corrupt"):
        (queue / q).mkdir(parents=True)
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "postqueue").write_text(f'#!/bin/sh\n[ "$1" = -j ] && cat {tmp_path}/showq\n')
    (bin_ / "postqueue").chmod(0o755)
    env = {**os.environ, "MC_LIB": str(script_lib(tmp_path / "lib", "filter")), "MC_STATE": str(tmp_path / "state"),
           "MC_QUEUE": str(queue), "PATH": f"{bin_}:{os.environ['PATH']}"}
    return queue, tmp_path / "showq", tmp_path / "state" / "metrics", env


def run_queue_metrics(env):
    r = subprocess.run(["bash", str(QUEUE_METRICS)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r


def test_the_queue_is_counted_from_its_directories_and_its_oldest_arrival_comes_from_postfix(spool):
    queue, showq, metrics, env = spool
    for f in ("deferred/A/4ABC1", "deferred/B/4ABC2", "deferred/B/4ABC3", "active/4ABC4"):
        (queue / f).parent.mkdir(exist_ok=True)
        (queue / f).write_text("x")
    # A sender may write anything after the fixed members: it cannot pose as them.
    hostile = r'x\", \"arrival_time\": 1, \"queue_name\": \"hold\"@example.net'
    showq.write_text(
        '{"queue_name": "deferred", "queue_id": "4ABC1", "arrival_time": 1700000300, "message_size": 10, '
        f'"forced_expire": false, "sender": "{hostile}", "recipients": []}}\n'
        '{"queue_name": "deferred", "queue_id": "4ABC2", "arrival_time": 1700000100, "message_size": 10, '
        '"forced_expire": false, "sender": "a@example.net", "recipients": []}\n'
        '{"queue_name": "active", "queue_id": "4ABC4", "arrival_time": 1700000500, "message_size": 10, '
        '"forced_expire": false, "sender": "", "recipients": []}\n')
    run_queue_metrics(env)
    got = samples(metrics / "queue.prom")
    assert {k: v for k, v in got.items() if k.startswith("mailcluster_postfix_queue_messages")} == {
        f'mailcluster_postfix_queue_messages{{queue="{q}"}}': n
        for q, n in {"maildrop": 0, "incoming": 0, "active": 1, "deferred": 3, "hold": 0, "corrupt": 0}.items()}
    assert {k: v for k, v in got.items() if "oldest" in k} == {
        'mailcluster_postfix_queue_oldest_arrival_timestamp_seconds{queue="deferred"}': 1700000100,
        'mailcluster_postfix_queue_oldest_arrival_timestamp_seconds{queue="active"}': 1700000500}
    assert (metrics / "queue.nonempty").exists()  # the timer keeps sampling


def test_an_emptied_queue_is_written_once_as_empty_and_a_stopped_postfix_still_has_counts(spool):
    queue, showq, metrics, env = spool
    (queue / "deferred" / "A").mkdir()
    (queue / "deferred" / "A" / "4ABC1").write_text("x")
    showq.write_text("")
    (showq.parent / "bin" / "postqueue").write_text("#!/bin/sh\necho 'postqueue: fatal: Queue report unavailable' >&2; exit 69\n")
    run_queue_metrics(env)
    assert samples(metrics / "queue.prom")['mailcluster_postfix_queue_messages{queue="deferred"}'] == 1
    (queue / "deferred" / "A" / "4ABC1").unlink()
    run_queue_metrics(env)
    got = samples(metrics / "queue.prom")
    assert set(got.values()) == {0} and len(got) == 6
    assert not (metrics / "queue.nonempty").exists()  # the timer's condition rests


def test_a_locked_mailstores_queue_has_no_figures_and_is_not_sampled_again(spool):
    queue, _, metrics, env = spool
    run_queue_metrics(env)
    assert (metrics / "queue.prom").exists()
    (metrics / "queue.nonempty").touch()
    shutil.rmtree(queue)  # the eCryptfs view unmounted
    run_queue_metrics(env)
    # An empty file: no stale figures, and the timer's conditions rest (a missing file
    # would have it sample every 30 s while the store stays locked).
    assert samples(metrics / "queue.prom") == {} and not (metrics / "queue.nonempty").exists()


def lib_call(tmp_path, script: str, role="mailstore", *libs: Path) -> subprocess.CompletedProcess:
    lib = script_lib(tmp_path / "lib", role, *libs)
    env = {**os.environ, "MC_LIB": str(lib), "MC_STATE": str(tmp_path / "state")}
    r = subprocess.run(["bash", "-c", f'set -uo pipefail; . "$MC_LIB/members.sh"; {script}'], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r


@pytest.mark.parametrize("calendar, seconds", [("hourly", 3600), ("daily", 86400), ("*-*-* 00/6:30", 6 * 3600)])
def test_the_backup_schedules_interval_is_told(tmp_path, calendar, seconds):
    lib_call(tmp_path, f'. "$MC_LIB/store.sh"; schedule_metrics "{calendar}"', "mailstore", STORE_LIB)
    assert samples(tmp_path / "state/metrics/backup-schedule.prom") == {"mailcluster_backup_interval_seconds": seconds}


def test_an_installed_certificate_tells_when_it_expires(tmp_path):
    tls = tmp_path / "tls"
    tls.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-subj", "/CN=filter1.example.test", "-days", "40", "-keyout", tls / "key.pem.tmp",
                    "-out", tls / "cert.pem.tmp"], check=True, capture_output=True)
    lib_call(tmp_path, f'install_tls {tls} acme', "filter")
    # Python's own reading of the certificate (its ssl module's decoder).
    expires = ssl.cert_time_to_seconds(ssl._ssl._test_decode_cert(str(tls / "cert.pem"))["notAfter"])
    assert samples(tmp_path / "state/metrics/tls.prom") == {
        'mailcluster_certificate_expiry_timestamp_seconds{source="acme"}': expires}
    assert abs(expires - time.time() - 40 * 86400) < 300
