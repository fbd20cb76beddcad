"""The backup channel's receiving ends, run on the host against scratch directories: what
arrives over the network is never followed as a link, never echoed back, and rsync runs
as a fixed server command that munges links."""
import os
import subprocess
import time
from pathlib import Path

import pytest

from appliance import paths
from tests.tools import samples, script_lib

STORE_LIB = paths.OVERLAYS / "60-mailstore/usr/lib/mailcluster"
LIBEXEC = paths.OVERLAYS / "60-mailstore/usr/libexec/mailcluster"
OWN_SIG = "0123456789abcdef"
SECRET = "the-primary's-eCryptfs-passphrase-0f1e2d3c4b5a69788796a5b4c3d2e1f0"


def pair_state(tmp_path, identity: str):
    """The handlers' library and a state directory of the pair store1 -> store2, as the
    node `identity` ("NAME ROLE ADDRESS") sees it."""
    lib = script_lib(tmp_path / "lib", "mailstore", STORE_LIB / "store.sh")
    state = tmp_path / "state"
    state.mkdir()
    (state / "identity").write_text(identity + "\n")
    (state / "members").write_text("node store1 mailstore 10.77.0.31 active\n"
                                   "node store2 mailstore 10.77.0.32 standby\nbackup store1 store2\n")
    return lib, state


@pytest.fixture
def node(tmp_path):
    """store1, rebuilt, with its own (empty) store and a secret it must never give away;
    its backup store2 has sent a store back and committed it."""
    lib, state = pair_state(tmp_path, "store1 mailstore 10.77.0.31")
    mail = tmp_path / "mail"
    (mail / "crypt").mkdir(parents=True)
    (mail / "crypt" / "own-mail").write_text("ciphertext")
    (mail / "key-signature").write_text(OWN_SIG + "\n")
    incoming = mail / "restore" / ".incoming"
    (incoming / "crypt").mkdir(parents=True)
    (incoming / "crypt" / "msg").write_text("ciphertext from the backup")
    (incoming / "key-signature").write_text(OWN_SIG + "\n")
    (mail / "restore" / "ready").write_text("store2\n")
    secret = tmp_path / "credentials" / "mailcluster.mailstore-key"
    secret.parent.mkdir()
    secret.write_text(SECRET)
    # The mounted plaintext view of store1's own store: what a rebuilt node has before
    # any mail, an index and Postfix's own files, but no message.
    vmail = tmp_path / "vmail"
    for f in ("mail/example.test/alice/sdbox/mailboxes/INBOX/dbox-Mails/dovecot.index.log",
              "postfix/pid/master.pid", "postfix/public/pickup"):
        (vmail / f).parent.mkdir(parents=True, exist_ok=True)
        (vmail / f).write_text("x")
    for d in ("maildrop", "incoming", "active", "deferred", "hold", "corrupt"):
        (vmail / "postfix" / d).mkdir()
    env = {**os.environ, "MC_LIB": str(lib), "MC_STATE": str(state), "MC_MAIL": str(mail),
           "MC_VMAIL": str(vmail)}
    return mail, secret, env


def apply(mail, env):
    r = subprocess.run(["bash", str(LIBEXEC / "restore-apply")], env=env, capture_output=True, text=True)
    return r, (mail / "restore" / "status").read_text() if (mail / "restore" / "status").exists() else ""


def untouched(mail):
    return (mail / "crypt" / "own-mail").read_text() == "ciphertext" and not (mail / "crypt" / "msg").exists()


def test_a_symlinked_key_signature_is_refused_and_the_target_never_echoed(node):
    mail, secret, env = node
    sig = mail / "restore" / ".incoming" / "key-signature"
    sig.unlink()
    sig.symlink_to(secret)
    r, status = apply(mail, env)
    assert r.returncode == 1 and status.startswith("refused: the store from store2 has no key signature file")
    assert SECRET not in status + r.stdout + r.stderr
    assert untouched(mail)


@pytest.mark.parametrize("content", [SECRET, "0123456789ABCDEF", OWN_SIG + "\nextra", ""])
def test_a_malformed_signature_is_refused_without_repeating_it(node, content):
    mail, _, env = node
    (mail / "restore" / ".incoming" / "key-signature").write_text(content)
    r, status = apply(mail, env)
    assert r.returncode == 1 and status.startswith("refused:"), status
    assert (content.strip() or "\0") not in status
    assert untouched(mail)


def test_another_key_is_refused_without_naming_either_signature(node):
    mail, _, env = node
    (mail / "restore" / ".incoming" / "key-signature").write_text("fedcba9876543210\n")
    r, status = apply(mail, env)
    assert r.returncode == 1 and "made with another key" in status
    assert "fedcba9876543210" not in status and OWN_SIG not in status
    assert untouched(mail)


@pytest.mark.parametrize("plant", ["symlink", "fifo", "symlinked-crypt"])
def test_links_and_special_files_in_the_received_store_are_refused(node, plant):
    mail, secret, env = node
    crypt = mail / "restore" / ".incoming" / "crypt"
    if plant == "symlink":
        (crypt / "link").symlink_to(secret)
    elif plant == "fifo":
        os.mkfifo(crypt / "fifo")
    else:
        (crypt / "msg").unlink()
        crypt.rmdir()
        crypt.symlink_to(secret.parent)
    r, status = apply(mail, env)
    assert r.returncode == 1 and status.startswith("refused:"), status
    assert untouched(mail)


def receive(tmp_path, kind, peer, request, extra_env=None, umask=-1):
    """backup-receive as sshd runs it, with an rsync on PATH that records its arguments."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    (bindir / "rsync").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/rsync-args\n")
    (bindir / "rsync").chmod(0o755)
    (bindir / "logger").write_text("#!/bin/sh\n")
    (bindir / "logger").chmod(0o755)
    mail = tmp_path / "mail"
    (mail / "backups" / peer).mkdir(parents=True, exist_ok=True)
    (mail / "restore").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "MC_MAIL": str(mail), "SSH_ORIGINAL_COMMAND": request,
           **(extra_env or {})}
    r = subprocess.run(["bash", str(LIBEXEC / "backup-receive"), kind, peer], env=env, capture_output=True, text=True,
                       umask=umask)
    args = tmp_path / "rsync-args"
    return r, args.read_text().split() if args.exists() else None


@pytest.mark.parametrize("kind,request_", [
    ("store", "rsync --server -logDtpre.iLsfxCIvu --delete --stats --numeric-ids --link-dest=../latest --fake-super . .partial/"),
    ("restore", "rsync --server -logDtpre.iLsfxCIvu --delete --stats --numeric-ids --fake-super . .incoming/"),
])
def test_the_receiving_rsync_always_munges_links(tmp_path, kind, request_):
    r, args = receive(tmp_path, kind, "store1", request_)
    assert r.returncode == 0, r.stderr
    assert args[:2] == ["--server", "--munge-links"] and args[2:] == request_.split()[2:]


@pytest.mark.parametrize("request_", [
    "rsync --server -logDtpKre.iLsfxCIvu --fake-super . .partial/",       # keep-dirlinks: follow a planted link
    "rsync --server -LogDtpre.iLsfxCIvu --fake-super . .partial/",        # copy-links
    "rsync --server -logDtpRre.iLsfxCIvu --fake-super . .partial/",       # relative paths
    "rsync --server --sender -logDtpre.iLsfxCIvu . .partial/",            # read back
    "rsync --server -logDtpre.iLsfxCIvu --fake-super . ../store2/",       # another primary's directory
    "rsync --server -logDtpre.iLsfxCIvu --fake-super . .partial/; id",
])
def test_other_rsync_requests_are_refused(tmp_path, request_):
    r, args = receive(tmp_path, "store", "store1", request_)
    assert r.returncode == 1 and "refused" in r.stderr and args is None


def commit(tmp_path, sent: str, policy="recent=1\ndaily=0\nmonthly=0\n"):
    (tmp_path / "policy").write_text(policy)
    r, _ = receive(tmp_path, "store", "store1", f"commit {sent}")
    return r


def snapshot_dir(tmp_path):
    return tmp_path / "mail" / "backups" / "store1"


def seed(tmp_path, names, latest):
    base = snapshot_dir(tmp_path)
    for n in names:
        (base / n / "crypt").mkdir(parents=True)
    (base / "latest").symlink_to(latest)
    (base / ".partial" / "crypt").mkdir(parents=True)
    (base / ".partial" / "crypt" / "new-mail").write_text("ciphertext")
    return base


@pytest.fixture
def prune_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MC_LIBEXEC", str(LIBEXEC))
    monkeypatch.setenv("MC_BACKUP_POLICY", str(tmp_path / "policy"))


def test_a_primary_whose_clock_is_behind_cannot_get_its_newest_backup_pruned(tmp_path, prune_env):
    """The primary's clock says 2020: the snapshot is named by the backup's own clock,
    becomes latest, and retention keeps it (it used to delete it and log "complete")."""
    base = seed(tmp_path, ["2026-11-25T120040Z"], "2026-11-25T120040Z")
    r = commit(tmp_path, "2020-01-01T000000Z")
    assert r.returncode == 0, r.stderr
    latest = base / "latest"
    assert (latest / "crypt" / "new-mail").read_text() == "ciphertext"
    assert latest.resolve().name > "2026-11-25T120040Z"
    assert not (base / "2020-01-01T000000Z").exists()


def test_latest_is_never_pruned_and_an_older_commit_is_refused(tmp_path, prune_env):
    # a backup node whose own clock went back: its newest snapshot is dated in the future
    base = seed(tmp_path, ["2026-11-25T120040Z", "2099-01-01T000000Z"], "2099-01-01T000000Z")
    r = commit(tmp_path, "2099-01-01T010000Z")
    assert r.returncode == 1 and "is not past the newest snapshot 2099-01-01T000000Z" in r.stderr
    assert (base / ".partial" / "crypt" / "new-mail").exists()  # nothing lost, nothing committed
    assert sorted(p.name for p in base.iterdir()) == [".partial", "2026-11-25T120040Z", "2099-01-01T000000Z", "latest"]
    # Retention alone, with latest on the snapshot that is older by name: kept anyway.
    (base / "latest").unlink()
    (base / "latest").symlink_to("2026-11-25T120040Z")
    subprocess.run(["bash", str(LIBEXEC / "backup-prune"), str(base), "1", "0", "0"], check=True)
    assert (base / "2026-11-25T120040Z").is_dir() and (base / "2099-01-01T000000Z").is_dir()


def test_a_full_backup_disk_is_said_plainly_and_not_retried(node, tmp_path):
    """The primary's side of a backup when its partner's disk is full: one clear line
    (whose disk, that nothing committed was lost, what to do), no commit, no retries."""
    mail, _, env = node
    state = tmp_path / "state"
    (state / "backup-key").mkdir()
    (state / "backup-key" / "id_ed25519.paired").touch()
    shims = tmp_path / "bin"
    shims.mkdir()
    calls = tmp_path / "calls"
    for name, body in {
        "mountpoint": "exit 0",
        "rsync": f'echo rsync >>{calls}; echo "rsync: [receiver] write failed on \\"/srv/mail/backups/store1/.partial/crypt/x\\": No space left on device (28)" >&2; exit 11',
        "ssh": f'echo "ssh $*" >>{calls}; exit 0',
        "sleep": f'echo sleep >>{calls}',
    }.items():
        (shims / name).write_text(f"#!/bin/bash\n{body}\n")
        (shims / name).chmod(0o755)
    r = subprocess.run(["bash", str(LIBEXEC / "backup")], capture_output=True, text=True,
                       env={**env, "PATH": f"{shims}:{os.environ['PATH']}"})
    assert r.returncode == 1
    assert "backup store2's disk is full" in r.stderr and "every snapshot committed before is intact" in r.stderr, r.stderr
    assert calls.read_text().splitlines() == ["rsync"], "committed, or retried, after a full disk"


def shim(tmp_path, **bodies) -> dict:
    """PATH with each named command replaced by a bash body."""
    shims = tmp_path / "bin"
    shims.mkdir(exist_ok=True)
    for name, body in bodies.items():
        (shims / name).write_text(f"#!/bin/bash\n{body}\n")
        (shims / name).chmod(0o755)
    return {"PATH": f"{shims}:{os.environ['PATH']}"}


# The mail partition with 1 MiB free, as df -P reports it.
FULL_DF = 'echo "Filesystem 1024-blocks Used Available Capacity Mounted on"; echo "/dev/vda3 1048576 1047552 1024 100% /srv/mail"'


def test_a_restore_that_does_not_fit_is_refused_before_the_store_is_touched(node, tmp_path):
    mail, _, env = node
    (mail / "restore" / ".incoming" / "crypt" / "big").write_bytes(os.urandom(2 << 20))
    calls = tmp_path / "calls"
    r, status = apply(mail, {**env, **shim(tmp_path, df=FULL_DF, systemctl=f"echo systemctl $* >>{calls}")})
    assert r.returncode == 1
    assert status.startswith("refused: not enough room on ") and "it needs 3 MiB, 1 MiB are free" in status, status
    assert "nothing changed" in status
    assert untouched(mail) and not calls.exists(), "the store was let go of before the copy was known to fit"


def test_a_takeover_that_does_not_fit_changes_nothing(tmp_path):
    """store2 takes over store1: the newest snapshot does not fit beside what its disk
    holds. Said before anything stops, with what it needs; its own store stays."""
    lib, state = pair_state(tmp_path, "store2 mailstore 10.77.0.32")
    mail = tmp_path / "mail"
    (mail / "crypt").mkdir(parents=True)
    (mail / "crypt" / "own").write_text("standby")
    snap = mail / "backups" / "store1" / "2026-12-01T000000Z"
    (snap / "crypt").mkdir(parents=True)
    (snap / "crypt" / "mbox").write_bytes(os.urandom(2 << 20))
    (snap / "key-signature").write_text(OWN_SIG + "\n")
    (snap.parent / "latest").symlink_to(snap.name)
    key = tmp_path / "key"
    key.write_text(SECRET)
    calls = tmp_path / "calls"
    env = {**os.environ, "MC_LIB": str(lib), "MC_STATE": str(state), "MC_MAIL": str(mail),
           **shim(tmp_path, df=FULL_DF, systemctl=f"echo systemctl $* >>{calls}",
                  **{"ecryptfs-add-passphrase": f'cat >/dev/null; echo "Inserted auth tok with sig [{OWN_SIG}] into the user session keyring"',
                     "systemd-creds": f"echo systemd-creds $* >>{calls}"})}
    r = subprocess.run(["bash", str(paths.OVERLAYS / "60-mailstore/usr/sbin/mailcluster-takeover"), "store1", str(key)],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 1, r
    assert "takeover: not enough room on " in r.stderr and "it needs 3 MiB, 1 MiB are free" in r.stderr, r.stderr
    assert r.stderr.rstrip().endswith("nothing changed")
    assert not calls.exists() and (mail / "crypt" / "own").read_text() == "standby"
    assert sorted(p.name for p in mail.iterdir()) == ["backups", "crypt"]  # nothing set aside


def test_only_the_newest_store_set_aside_is_kept(tmp_path):
    """Each takeover or restore sets the current store aside; the one before is deleted,
    and said so, instead of filling the disk one store per fail-over."""
    mail = tmp_path / "mail"
    (mail / "crypt").mkdir(parents=True)
    (mail / "crypt" / "current").write_text("x")
    (mail / "key-signature").write_text(OWN_SIG + "\n")
    for old in ("replaced-20261101T000000Z", "replaced-20261102T000000Z", "standby-20261101T000000Z"):
        (mail / old / "crypt").mkdir(parents=True)
    (mail / "replaced-link").symlink_to(tmp_path)  # (nothing that is not a directory of ours is touched)
    r = subprocess.run(["bash", "-c", f'. {STORE_LIB / "store.sh"}; set_store_aside replaced'],
                       env={**os.environ, "MC_MAIL": str(mail)}, capture_output=True, text=True)
    assert r.returncode == 0, r
    aside = Path(r.stdout.strip())
    assert (aside / "crypt" / "current").read_text() == "x" and (aside / "key-signature").exists()
    assert sorted(p.name for p in mail.iterdir()) == sorted([aside.name, "replaced-link", "standby-20261101T000000Z"])
    assert r.stderr.count("deleted ") == 2 and "replaced-20261101T000000Z" in r.stderr, r.stderr


# What a store holding mail has in its mounted view: a mailbox message (sdbox: u.UID),
# or a message in Postfix's queue (deferred, hashed one level deep).
MAIL_HELD = ["mail/example.test/alice/sdbox/mailboxes/INBOX/dbox-Mails/u.1", "postfix/deferred/4/4F2A81C3",
             "postfix/incoming/4F2A81C4", "postfix/hold/4F2A81C5"]


@pytest.mark.parametrize("held", MAIL_HELD)
def test_a_store_that_holds_mail_is_never_replaced(node, tmp_path, held):
    """Anyone with the pairing secret (on both nodes' ESPs) can send a store; a restore
    is for a rebuilt node, and must never set aside one that holds mail."""
    mail, _, env = node
    (Path(env["MC_VMAIL"]) / held).parent.mkdir(parents=True, exist_ok=True)
    (Path(env["MC_VMAIL"]) / held).write_text("a message")
    calls = tmp_path / "calls"
    r, status = apply(mail, {**env, **shim(tmp_path, systemctl=f"echo systemctl $* >>{calls}")})
    assert r.returncode == 1
    assert status.startswith("refused: store1's store holds mail, and a restore replaces only an empty store"), status
    assert status.rstrip().endswith("Nothing changed")
    assert untouched(mail) and not calls.exists()
    assert sorted(p.name for p in mail.iterdir()) == ["crypt", "key-signature", "restore"]  # nothing set aside


def test_a_store_that_is_not_mounted_is_not_replaced(node, tmp_path):
    """Without the mounted view there is no telling whether the store holds mail."""
    mail, _, env = node
    calls = tmp_path / "calls"
    r, status = apply(mail, {**env, "MC_VMAIL": str(tmp_path / "unmounted"),
                             **shim(tmp_path, systemctl=f"echo systemctl $* >>{calls}")})
    assert r.returncode == 1 and "mail store is not mounted" in status, status
    assert untouched(mail) and not calls.exists()


def test_a_rebuilt_nodes_empty_store_is_set_aside_and_replaced(node, tmp_path):
    """The path a real restore takes, up to the services: an empty store (indexes and
    Postfix's own files, no message) is set aside and the received one put in place.
    (systemctl is a shim that fails here, so the restore ends at starting the services.)"""
    mail, _, env = node
    calls = tmp_path / "calls"
    r, status = apply(mail, {**env, **shim(tmp_path, systemctl=f"echo systemctl $* >>{calls}; exit 1")})
    assert status.startswith("failed: the restored store does not mount or serve"), (status, r.stderr)
    assert (mail / "crypt" / "msg").read_text() == "ciphertext from the backup"
    aside = [p for p in mail.iterdir() if p.name.startswith("replaced-")]
    assert len(aside) == 1 and (aside[0] / "crypt" / "own-mail").read_text() == "ciphertext"
    assert calls.read_text().splitlines()[0] == "systemctl stop postfix.service dovecot.service mailcluster-mailcrypt.service"


# ---- one account per primary on the backup --------------------------------------------
def keys_for(tmp_path, account: str) -> list[str]:
    """sshd's AuthorizedKeysCommand (backup-keys) for `account` on backup_node's node: the
    lines it admits."""
    env = {**os.environ, "MC_LIB": str(tmp_path / "lib"), "MC_STATE": str(tmp_path / "state"),
           "MC_RUN": str(tmp_path / "run")}
    r = subprocess.run(["bash", str(LIBEXEC / "backup-keys"), account], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def ed25519(n: int) -> str:
    return "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI" + f"{n:043d}"


def backup_node(tmp_path):
    """store2, keeping backups of store1 and store3; store2's own backup is store1."""
    pair_state(tmp_path, "store2 mailstore 10.77.0.32")
    run, state = tmp_path / "run", tmp_path / "state"
    for d in ("pairing", "restore-keys"):
        (run / d).mkdir(parents=True)
    (run / "pairing" / "store1.pub").write_text(ed25519(1) + " mailcluster-pairing store1\n")
    (run / "pairing" / "store3.pub").write_text(ed25519(3) + " mailcluster-pairing store3\n")
    (run / "restore-keys" / "store1.pub").write_text(ed25519(21) + " mailcluster-pairing store2\n")
    for p, n in (("store1", 11), ("store3", 13)):
        (state / "paired" / p).mkdir(parents=True)
        (state / "paired" / p / "key.pub").write_text(f"{ed25519(n)} {p}\n")
    return run, state


def test_each_primarys_account_admits_that_primarys_keys_only(tmp_path):
    backup_node(tmp_path)
    command = 'restrict,command="/usr/libexec/mailcluster/backup-receive'
    assert keys_for(tmp_path, "mcb-store1") == [f'{command} pair store1" {ed25519(1)}',
                                                f'{command} store store1" {ed25519(11)}']
    assert keys_for(tmp_path, "mcb-store3") == [f'{command} pair store3" {ed25519(3)}',
                                                f'{command} store store3" {ed25519(13)}']
    # mcbackup only takes this node's own store back from its backup.
    assert keys_for(tmp_path, "mcbackup") == [f'{command} restore store1" {ed25519(21)}']
    for account in ("mcb-store9", "mcb-../store1", "mcb-", "root", "mcjoin"):
        assert keys_for(tmp_path, account) == [], account


@pytest.mark.parametrize("plant", ["options", "second-line", "symlink", "directory", "rsa"])
def test_a_registered_key_is_passed_on_only_as_one_checked_key(tmp_path, plant):
    """A primary writes its own registered key file (as its account): whatever it puts
    there, sshd gets at most that one ed25519 key, bound to that primary's command."""
    _, state = backup_node(tmp_path)
    key = state / "paired" / "store1" / "key.pub"
    key.unlink()
    if plant == "options":
        key.write_text(f'command="/bin/sh" {ed25519(11)}\n')
    elif plant == "second-line":
        key.write_text(f"{ed25519(11)} store1\nrestrict,command=\"/usr/libexec/mailcluster/backup-receive store store3\" "
                       f"{ed25519(13)}\n")
    elif plant == "symlink":
        key.symlink_to(state / "paired" / "store3" / "key.pub")
    elif plant == "directory":
        key.mkdir()
    else:
        key.write_text("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ store1\n")
    lines = keys_for(tmp_path, "mcb-store1")
    assert lines == [f'restrict,command="/usr/libexec/mailcluster/backup-receive pair store1" {ed25519(1)}'], lines


def test_pairing_registers_the_key_in_that_primarys_own_directory(tmp_path):
    _, state = backup_node(tmp_path)
    (state / "paired" / "store1" / "key.pub").unlink()
    env = {"MC_STATE": str(state)}
    # (run as sshd may run it, with a umask that keeps new files private: backup-keys
    # reads the key as another user, mcbackup)
    r, _ = receive(tmp_path, "pair", "store1", f"pair {ed25519(42)} mailcluster-backup store1", env, umask=0o077)
    assert r.returncode == 0, r.stderr
    assert (state / "paired" / "store1" / "key.pub").read_text() == f"{ed25519(42)} store1\n"
    assert (state / "paired" / "store1" / "key.pub").stat().st_mode & 0o777 == 0o644
    assert (state / "paired" / "store3" / "key.pub").read_text() == f"{ed25519(13)} store3\n"
    # A primary whose directory backup-pair never made (no account of its own) registers nothing.
    r, _ = receive(tmp_path, "pair", "store9", f"pair {ed25519(43)}", env)
    assert r.returncode == 1 and "cannot register the key" in r.stderr
    assert not (state / "paired" / "store9").exists()


@pytest.mark.parametrize("reply, snapshots", [
    ("snapshot 2026-12-06T120000Z complete on store2; 7 snapshots kept", 7),
    # A partner that answers anything else gives no figure, and nothing of its answer.
    ('snapshot x complete on store2; 7 snapshots kept\nmailcluster_mailstore_key_mounted 1 # ', 0),
])
def test_a_completed_backup_tells_prometheus_when_how_big_and_how_many_snapshots(node, tmp_path, reply, snapshots):
    _, _, env = node
    state = tmp_path / "state"
    (state / "backup-key").mkdir()
    (state / "backup-key" / "id_ed25519.paired").touch()
    stats = "Number of files: 3\\nTotal file size: 123456 bytes\\nTotal transferred file size: 100 bytes"
    path = shim(tmp_path, mountpoint="exit 0", rsync=f'printf "{stats}\\n"',
                ssh=f"printf '%s\\n' {subprocess.list2cmdline([reply])}")
    before = int(time.time())
    r = subprocess.run(["bash", str(LIBEXEC / "backup")], capture_output=True, text=True, env={**env, **path})
    assert r.returncode == 0, r.stderr
    got = samples(state / "metrics" / "backup.prom")
    assert before <= got['mailcluster_backup_last_success_timestamp_seconds{backup="store2"}'] <= time.time()
    assert got['mailcluster_backup_size_bytes{backup="store2"}'] == 123456
    assert got['mailcluster_backup_snapshots{backup="store2"}'] == snapshots
    assert len(got) == 3


def test_a_commit_says_how_many_snapshots_the_backup_keeps(tmp_path, prune_env):
    seed(tmp_path, ["2026-11-25T120040Z", "2026-11-26T120040Z"], "2026-11-26T120040Z")
    r = commit(tmp_path, "2026-12-06T120000Z", policy="recent=2\ndaily=0\nmonthly=0\n")
    assert r.returncode == 0, r.stderr
    kept = [p for p in snapshot_dir(tmp_path).iterdir() if p.name[0].isdigit()]
    assert len(kept) == 2 and r.stdout.strip().endswith("; 2 snapshots kept"), r.stdout
