# Hardened layer, for interactive shells (administrators on the console or over SSH):
# no core dumps, and an idle shell closes itself after 15 minutes.
ulimit -S -c 0 >/dev/null 2>&1
if [ -z "${TMOUT-}" ]; then
	TMOUT=900
	readonly TMOUT
	export TMOUT
fi
