# What the frontend serves over HTTPS on 443, shared by mta-sts and wkd.
# shellcheck shell=bash

# https_rules NAME: stdin (HAProxy http-request rules) becomes NAME's part of the HTTPS
# frontend, which is then written anew: its head (haproxy-https.cfg), every part, and 404
# for anything else. HAProxy loads it from haproxy.d (haproxy.service.d/60-sandbox.conf).
https_rules() {
	local rules parts
	rules=$(cat)
	install -d -m 0755 "$MC_RUN_DIR/https.d" "$MC_RUN_DIR/haproxy.d"
	printf '%s\n' "$rules" | put "$MC_RUN_DIR/https.d/$1.rules"
	parts=$(cat "${MC_LIB:-/usr/lib/mailcluster}/haproxy-https.cfg" "$MC_RUN_DIR"/https.d/*.rules)
	printf '%s\n\thttp-request return status 404 content-type text/plain string "not found"\n' "$parts" |
		put "$MC_RUN_DIR/haproxy.d/https.cfg"
}
MC_RUN_DIR=${MC_RUN:-/run/mailcluster}
