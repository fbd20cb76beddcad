"""The backup node's retention policy (overlays/60-mailstore/.../backup-prune), run on
real directories: what survives is what an operator's restore would need."""
import subprocess
from datetime import datetime, timedelta, timezone

from appliance import paths

PRUNE = paths.OVERLAYS / "60-mailstore/usr/libexec/mailcluster/backup-prune"


def snapshots(tmp_path, times):
    for t in times:
        (tmp_path / t.strftime("%Y-%m-%dT%H%M%SZ") / "crypt").mkdir(parents=True)


def prune(tmp_path, recent, daily, monthly):
    r = subprocess.run(["bash", str(PRUNE), str(tmp_path), str(recent), str(daily), str(monthly)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return sorted(p.name for p in tmp_path.iterdir())


def test_keeps_recent_then_one_per_day_then_one_per_month(tmp_path):
    now = datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)
    hourly = [now - timedelta(hours=h) for h in range(24 * 2 * 365)]  # two years of hourly runs
    snapshots(tmp_path, sorted(set(hourly[::13] + hourly[:30])))  # every 13th hour, and the last 30 hours
    kept = prune(tmp_path, recent=24, daily=30, monthly=120)
    assert kept[-24:] == sorted(t.strftime("%Y-%m-%dT%H%M%SZ") for t in hourly[:24])
    days = {k[:10] for k in kept}
    months = {k[:7] for k in kept}
    assert len(months) == 25  # every month of two years (and a bit) has its newest snapshot
    # one per day for the last 30 days, beyond the recent ones
    assert len([d for d in days if d >= "2026-10-27"]) == 30
    older = [k for k in kept if k[:10] < "2026-10-26"]
    assert len(older) == len({k[:7] for k in older}), "more than one snapshot kept for an old month"
    assert len(kept) < 24 + 30 + 25


def test_two_runs_in_one_hour_are_both_kept_and_junk_is_left_alone(tmp_path):
    snapshots(tmp_path, [datetime(2026, 11, 25, 12, 0, 1), datetime(2026, 11, 25, 12, 0, 40)])
    (tmp_path / ".partial").mkdir()
    (tmp_path / "latest").symlink_to("2026-11-25T120040Z")
    assert prune(tmp_path, 24, 30, 120) == [".partial", "2026-11-25T120001Z", "2026-11-25T120040Z", "latest"]


def test_bad_policy_is_refused_and_deletes_nothing(tmp_path):
    snapshots(tmp_path, [datetime(2026, 1, d) for d in range(1, 5)])
    r = subprocess.run(["bash", str(PRUNE), str(tmp_path), "0", "30", "x"], capture_output=True, text=True)
    assert r.returncode == 2 and "retention must be numbers" in r.stderr
    assert len(list(tmp_path.iterdir())) == 4
