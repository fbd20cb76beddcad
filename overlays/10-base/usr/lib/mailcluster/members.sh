# Cluster membership, shared by the identity check, the join handler and the appliers.
#
# /var/lib/mailcluster/members is the node's view of the cluster. It starts as the
# mailcluster.peers credential (the site's nodes when the credentials were made) and
# changes only through authenticated announcements (join-request). One record per line:
#   node NAME ROLE ADDRESS STATE    STATE: active | standby (a backup mailstore)
#   user ADDRESS MAILSTORE          where the filters deliver ADDRESS's mail
#   alias ADDRESS TARGET[,TARGET]   mail to ADDRESS goes to the TARGETs instead
#   catchall DOMAIN TARGET[,TARGET] mail to DOMAIN's other addresses goes to the TARGETs
#   backup PRIMARY BACKUP           who keeps PRIMARY's encrypted backups
# shellcheck shell=bash

# The image's plan, rendered by the builder (appliance/plan.py): this node's role
# (MC_ROLE), every role (MC_ROLES), their member sets (MC_SET) and ports (MC_PORT_*).
# (MC_LIB, MC_STATE, MC_ETC: overridable so that tests can run these scripts against
# scratch directories.)
# shellcheck source=plan.sh
. "${MC_LIB:-/usr/lib/mailcluster}/plan.sh"
MC_STATE=${MC_STATE:-/var/lib/mailcluster}
MC_ETC=${MC_ETC:-/etc}
MEMBERS=$MC_STATE/members

# What to do about a missing or malformed credential, for the scripts' messages.
# shellcheck disable=SC2034
FIX_CREDENTIALS="make this node's credentials with ./build.py credentials NODE"

# fail STATUS MESSAGE...: MESSAGE on stderr (after "$MC_WHO: ", for a command that sets
# it), then exit with STATUS. die MESSAGE...: the same, with status 1.
fail() {
	local status=$1
	shift
	echo "${MC_WHO:+$MC_WHO: }$*" >&2
	exit "$status"
}
die() { fail 1 "$@"; }

# put FILE [MODE]: stdin into FILE atomically (a reader sees the old content or the new,
# never part of either), with MODE (default 0644). Only from input that cannot fail
# half-way (a file, a variable): in a pipeline, a failing producer would not stop it.
put() {
	cat >"$1.new" && chmod "${2:-0644}" "$1.new" && mv -T "$1.new" "$1"
}
# update FILE: stdin into FILE atomically; true only if the content changed.
update() {
	cat >"$1.new" || return 2
	if cmp -s "$1.new" "$1"; then rm -f "$1.new"; return 1; fi
	mv -T "$1.new" "$1"
}

# The node's own figures for Prometheus: the node exporter's textfile collector reads
# every *.prom file in METRICS (its unit's drop-in points it here). Each writer owns one
# file and rewrites it whole when what it measures changes.
METRICS=${MC_METRICS:-$MC_STATE/metrics}
# put_metrics NAME TEXT: TEXT (Prometheus' text format) becomes METRICS/NAME.prom.
put_metrics() {
	install -d -m 0755 "$METRICS" && printf '%s\n' "$2" | put "$METRICS/$1.prom" 0644
}

valid_name() { [[ $1 =~ ^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$ ]]; }
valid_role() { valid_name "$1" && [[ " ${MC_ROLES[*]} " == *" $1 "* ]]; }
valid_state() { [[ $1 == active || $1 == standby ]]; }
valid_domain() { [[ $1 =~ ^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$ ]]; }
valid_user() { [[ $1 =~ ^[A-Za-z0-9._%+-]+@(.*)$ ]] && valid_domain "${BASH_REMATCH[1]}"; }
valid_targets() {
	local target targets
	IFS=, read -ra targets <<<"$1"
	for target in "${targets[@]}"; do valid_user "$target" || { echo "bad $2 target '$target'"; return; }; done
}
valid_ipv4() {
	[[ $1 =~ ^([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})$ ]] || return 1
	local o
	for o in "${BASH_REMATCH[@]:1}"; do ((10#$o <= 255)) || return 1; done
}

# install_tls DIR SOURCE: DIR's key.pem.tmp and cert.pem.tmp become the node's pair (the
# key first: a daemon that starts in between reads the old pair or fails this once), and
# SOURCE (site, acme or self-signed) is recorded. HAProxy, which never runs as root,
# reads both from haproxy.pem, readable by its group (a frontend's MTA-STS policy HTTPS).
install_tls() {
	if getent group haproxy >/dev/null; then
		cat "$1/cert.pem.tmp" "$1/key.pem.tmp" | put "$1/haproxy.pem.tmp" 0600
		chgrp haproxy "$1/haproxy.pem.tmp" && chmod 0640 "$1/haproxy.pem.tmp"
		mv -T "$1/haproxy.pem.tmp" "$1/haproxy.pem"
	fi
	mv -T "$1/key.pem.tmp" "$1/key.pem"
	mv -T "$1/cert.pem.tmp" "$1/cert.pem"
	echo "$2" | put "$1/source"
	local end
	end=$(openssl x509 -noout -enddate -in "$1/cert.pem" | sed -n 's/^notAfter=//p') && end=$(date -d "$end" +%s) &&
		put_metrics tls "# HELP mailcluster_certificate_expiry_timestamp_seconds When the node's TLS certificate expires, by where it came from.
# TYPE mailcluster_certificate_expiry_timestamp_seconds gauge
mailcluster_certificate_expiry_timestamp_seconds{source=\"$2\"} $end" || echo "could not write the certificate's metrics" >&2
}

# resolv_conf FILE: resolv.conf for the addresses in FILE (one per line, at most three;
# none, or no FILE: a node that resolves nothing), or what is wrong with them (status 1).
resolv_conf() {
	local address n=0
	echo "# From credential mailcluster.resolvers (the site's network.resolvers)"
	if [[ -e $1 ]]; then
		while IFS= read -r address || [[ -n $address ]]; do
			if ! valid_ipv4 "$address" || ((++n > 3)); then
				echo "bad resolver '${address:0:40}' (at most three IPv4 addresses)"
				return 1
			fi
			echo "nameserver $address"
		done <"$1"
	fi
	if ((n)); then echo "options trust-ad"; else echo "# none: this node resolves no name outside /etc/hosts"; fi
}

# check_record FIELD...: empty output if the record is well formed, else what is wrong.
check_record() {
	case ${1:-} in
	node)
		(($# == 5)) || { echo "a node record has 5 fields (node NAME ROLE ADDRESS STATE), not $#"; return; }
		valid_name "$2" || { echo "bad node name '$2'"; return; }
		valid_role "$3" || { echo "bad role '$3' (${MC_ROLES[*]})"; return; }
		valid_ipv4 "$4" || { echo "bad IPv4 address '$4'"; return; }
		valid_state "$5" || echo "bad state '$5' (active or standby)" ;;
	user)
		(($# == 3)) || { echo "a user record has 3 fields (user ADDRESS MAILSTORE), not $#"; return; }
		valid_user "$2" || { echo "bad mail address '$2'"; return; }
		valid_name "$3" || echo "bad mailstore name '$3'" ;;
	alias)
		(($# == 3)) || { echo "an alias record has 3 fields (alias ADDRESS TARGET[,TARGET...]), not $#"; return; }
		valid_user "$2" || { echo "bad mail address '$2'"; return; }
		valid_targets "$3" alias ;;
	catchall)
		(($# == 3)) || { echo "a catchall record has 3 fields (catchall DOMAIN TARGET[,TARGET...]), not $#"; return; }
		valid_domain "$2" || { echo "bad domain '$2'"; return; }
		valid_targets "$3" catch-all ;;
	backup)
		(($# == 3)) || { echo "a backup record has 3 fields (backup PRIMARY BACKUP), not $#"; return; }
		valid_name "$2" && valid_name "$3" || echo "bad node name in '$*'" ;;
	*) echo "unknown record type '${1:-}'" ;;
	esac
}

# check_members FILE: prints "line N: problem" for the first bad line and fails.
check_members() {
	local n=0 line problem
	while IFS= read -r line || [[ -n $line ]]; do
		n=$((n + 1))
		[[ -z ${line// /} || $line == \#* ]] && continue
		# shellcheck disable=SC2086  # fields are split on purpose
		problem=$(check_record $line)
		[[ -z $problem ]] || { echo "line $n: $problem"; return 1; }
	done <"$1"
}

# nodes ROLE [STATE]: "NAME ADDRESS" of each member with that role (and state)
nodes() { awk -v r="$1" -v s="${2:-}" '$1 == "node" && $3 == r && (s == "" || $5 == s) { print $2, $4 }' "$MEMBERS" | sort; }
# addresses ROLE [STATE]: just the addresses
addresses() { nodes "$@" | awk '{ print $2 }'; }
address_of() { awk -v n="$1" '$1 == "node" && $2 == n { print $4 }' "$MEMBERS"; }
# A system credential's value. QEMU's (SMBIOS) arrive in @system; those `./build.py flash`
# put on the ESP count as untrusted and arrive sealed in @encrypted.
read_credential() {
	if [[ -s /run/credentials/@system/$1 ]]; then
		cat -- "/run/credentials/@system/$1"
	elif [[ -s /run/credentials/@encrypted/$1 ]]; then
		systemd-creds decrypt --name="$1" "/run/credentials/@encrypted/$1" - 2>/dev/null
	else
		return 1
	fi
}
self_name() { awk '{ print $1 }' "$MC_STATE/identity"; }
state_of() { awk -v n="$1" '$1 == "node" && $2 == n { print $5 }' "$MEMBERS"; }
# backup_of PRIMARY: the node that keeps PRIMARY's backups (empty if none)
backup_of() { awk -v p="$1" '$1 == "backup" && $2 == p { print $3 }' "$MEMBERS"; }

# set_node NAME ROLE ADDRESS STATE: NAME as it is now, replacing any record with its
# name or its address.
set_node() {
	replace_members -v n="$1" -v a="$3" '!($1 == "node" && ($2 == n || $4 == a))'
	echo "node $1 $2 $3 $4" >>"$MEMBERS"
}

# cluster_ssh KEY [CERT]: the ssh command line of every connection between members (KEY,
# with its certificate CERT if given, only; never a prompt). A peer's host key is pinned at first contact, and again after the
# peer announces itself with its certified key (members, fold join: a rebuilt node has new
# host keys); the keys, not the host keys, are what authenticate.
cluster_ssh() {
	echo "ssh -i $1 ${2:+-o CertificateFile=$2 }-o IdentitiesOnly=yes -o BatchMode=yes -o ConnectTimeout=10 -o StrictHostKeyChecking=accept-new" \
		"-o UserKnownHostsFile=$MC_STATE/known_hosts -o LogLevel=ERROR"
}

# back_off: sleep for $delay seconds, then double it, up to 5 minutes. For scripts that
# retry a peer themselves (Type=exec services), so that boot-up never waits on them.
back_off() {
	sleep "$delay"
	delay=$((delay < 300 ? delay * 2 : 300))
}

# replace_members SCRIPT: rewrites the members file through awk SCRIPT, atomically.
replace_members() {
	awk "$@" "$MEMBERS" >"$MEMBERS.new" && mv -T "$MEMBERS.new" "$MEMBERS"
}
