"""A load generator that runs inside a guest (bash, no extra packages): n messages of
about `size` bytes over SMTP or LMTP, in parallel sessions, timed in the guest so that
the control channel's overhead is not counted. Bodies are random (base64 of urandom):
nothing compresses or deduplicates them."""
from __future__ import annotations

import shlex

SCRIPT = r"""
set -euo pipefail
proto=$1 server=$2 port=$3 n=$4 size=$5 sessions=$6; shift 6; rcpts=("$@")
tag=$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n')
# No Date header would add to rspamd's score (MISSING_DATE) and could get bench mail greylisted.
now=$(date -R)
body=$(mktemp); head -c $((size * 3 / 4)) /dev/urandom | base64 -w 76 | sed 's/$/\r/' >"$body"
session() {
	local count=$1 s=$2 i line rcpt
	exec 3<>"/dev/tcp/$server/$port"
	expect() { while IFS= read -r -t 120 -u3 line; do line=${line%$'\r'}; [[ $line == "$1-"* ]] && continue
		[[ $line == "$1 "* ]] && return 0; echo "session $s: server said: $line" >&2; return 1; done
		echo "session $s: no answer" >&2; return 1; }
	say() { printf '%s\r\n' "$1" >&3; }
	expect 220; if [[ $proto == lmtp ]]; then say "LHLO bench.example.test"; else say "EHLO bench.example.test"; fi; expect 250
	for ((i = 0; i < count; i++)); do
		rcpt=${rcpts[(s + i) % ${#rcpts[@]}]}
		say "MAIL FROM:<bench@example.org>"; expect 250
		say "RCPT TO:<$rcpt>"; expect 250
		say DATA; expect 354
		{ printf 'From: bench@example.org\r\nTo: %s\r\nDate: %s\r\nSubject: bench %s %s.%s\r\nMessage-ID: <bench-%s-%s-%s@example.org>\r\n\r\n' \
			"$rcpt" "$now" "$tag" "$s" "$i" "$tag" "$s" "$i"; cat "$body"; printf '.\r\n'; } >&3
		expect 250
	done
	say QUIT
}
start=$(date +%s.%N)
pids=()
for ((s = 0; s < sessions; s++)); do
	session $((n / sessions + (s < n % sessions ? 1 : 0))) "$s" & pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
end=$(date +%s.%N)
rm -f "$body"
echo "SENT $n $(awk -v a="$start" -v b="$end" 'BEGIN { print b - a }')"
"""


def send_script(proto: str, server: str, port: int, n: int, size: int, rcpts: list[str], sessions: int = 1) -> str:
    """The command that sends the load; its last line is "SENT n SECONDS"."""
    args = " ".join(shlex.quote(str(a)) for a in (proto, server, port, n, size, sessions, *rcpts))
    return f"bash -c {shlex.quote(SCRIPT)} load {args}"


def sent_seconds(out: str) -> float:
    line = [x for x in out.splitlines() if x.startswith("SENT ")][-1]
    return float(line.split()[2])
