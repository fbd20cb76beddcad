# Swapping the mail store under /srv/mail, shared by mailcluster-takeover (a backup
# takes its primary's store) and restore-apply (a rebuilt primary gets its store back).
# shellcheck shell=bash

# The mail data partition, and the plaintext view of the store mounted from it
# (mailcluster-mailcrypt); scratch directories in the host tests.
MAIL=${MC_MAIL:-/srv/mail}
VMAIL=${MC_VMAIL:-/var/vmail}

# What of /srv/mail is the store, as rsync filter rules: the eCryptfs ciphertext and the
# key's signature, never the plaintext view (and nothing else on the partition).
# shellcheck disable=SC2034  # (used by the scripts that source this)
STORE_FILES=(--include=/key-signature --include=/crypt/ --include='/crypt/**' --exclude='*')

# set_store_aside WHY: moves this node's store (crypt/ and key-signature) into
# $MAIL/WHY-STAMP, kept rather than deleted, and prints that directory. Only the newest
# of each WHY is kept: older ones are deleted (and said so on stderr), so that a node
# that takes over or is restored again and again does not fill its disk.
set_store_aside() {
	local aside old
	aside=$MAIL/$1-$(date -u +%Y%m%dT%H%M%SZ)
	mkdir "$aside" || return 1
	if [[ -e $MAIL/crypt ]]; then mv "$MAIL/crypt" "$aside/" || return 1; fi
	if [[ -e $MAIL/key-signature ]]; then mv "$MAIL/key-signature" "$aside/" || return 1; fi
	for old in "$MAIL/$1"-*; do
		[[ -d $old && ! -L $old && $old != "$aside" ]] || continue
		rm -rf -- "$old" && echo "deleted $old, set aside before $aside" >&2
	done
	echo "$aside"
}

# room_for DIR: succeeds if $MAIL has room for a copy of DIR's store with 5% to spare
# (the copy is made before the current store is let go), else says what is missing.
room_for() {
	local need free
	need=$(du -sk -- "$1/crypt" | awk '{ print $1 }')
	free=$(df -Pk -- "$MAIL" | awk 'NR == 2 { print $4 }')
	((need + need / 20 < free)) && return 0
	echo "not enough room on $MAIL for a copy of the store in $1: it needs $((need / 1024 + 1)) MiB, $((free / 1024)) MiB are free (stores set aside earlier are in $MAIL/standby-* and $MAIL/replaced-*)"
	return 1
}

# mail_in_store: prints how many messages the mounted store holds: mailbox messages
# (sdbox keeps each in a file u.UID; indexes and empty mailboxes are not mail) and
# messages in Postfix's queue. Fails when the store is not mounted: nothing to count.
mail_in_store() {
	local q=$VMAIL/postfix
	[[ -d $VMAIL/mail && -d $q ]] || return 1
	{
		find "$VMAIL/mail" -type f -name 'u.*'
		find "$q" -type f \( -path "$q/maildrop/*" -o -path "$q/incoming/*" -o -path "$q/active/*" \
			-o -path "$q/deferred/*" -o -path "$q/hold/*" -o -path "$q/corrupt/*" \)
	} | wc -l
}

# install_store DIR: DIR's crypt/ and key-signature, as a backup account received them, become
# this node's store. A copy, not hard links: Dovecot updates index files in place, and
# DIR stays as it was. Owners and modes come back from the xattrs that account kept
# them in (--fake-super).
install_store() {
	rsync -a --numeric-ids --fake-super -M--super "$1/crypt/" "$MAIL/crypt/" &&
		rsync -a --numeric-ids --fake-super -M--super "$1/key-signature" "$MAIL/key-signature"
}

# backup_metrics BACKUP WHEN [SIZE SNAPSHOTS]: the last successful backup to BACKUP, for
# Prometheus (WHEN: seconds since the epoch; before the first one, when pairing began,
# so that a primary that never manages one is noticed like one whose backups stopped).
backup_metrics() {
	local text="# HELP mailcluster_backup_last_success_timestamp_seconds When the last backup to the backup peer completed (before the first: when pairing began).
# TYPE mailcluster_backup_last_success_timestamp_seconds gauge
mailcluster_backup_last_success_timestamp_seconds{backup=\"$1\"} $2"
	if (($# == 4)); then
		text+="
# HELP mailcluster_backup_size_bytes Size of the store that backup sent (its ciphertext).
# TYPE mailcluster_backup_size_bytes gauge
mailcluster_backup_size_bytes{backup=\"$1\"} $3
# HELP mailcluster_backup_snapshots Snapshots of this store the backup peer keeps, after that backup.
# TYPE mailcluster_backup_snapshots gauge
mailcluster_backup_snapshots{backup=\"$1\"} $4"
	fi
	put_metrics backup "$text"
}

# schedule_metrics CALENDAR: how often the backup timer fires (OnCalendar CALENDAR), for
# the alert on a backup older than twice that.
schedule_metrics() {
	local at
	mapfile -t at < <(systemd-analyze calendar --iterations=2 "$1" | sed -n 's/^ *\(Next elapse\|Iteration #2\): //p')
	((${#at[@]} == 2)) && at=("$(date -d "${at[0]}" +%s)" "$(date -d "${at[1]}" +%s)") || return 1
	put_metrics backup-schedule "# HELP mailcluster_backup_interval_seconds Time between two scheduled backups (site: backups[].schedule).
# TYPE mailcluster_backup_interval_seconds gauge
mailcluster_backup_interval_seconds $((at[1] - at[0]))"
}
