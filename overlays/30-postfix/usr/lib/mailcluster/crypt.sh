# The eCryptfs stores of this appliance, one implementation for both: a mailstore's mail
# store (mailcrypt) and a filter's Postfix queue (spoolcrypt).
# shellcheck shell=bash

# crypt_mount LOWER UPPER KEY STAMP: mounts the ciphertext in LOWER at UPPER with the
# passphrase in the credential file KEY. STAMP records the key's signature on first use;
# afterwards a different key is refused, and so is data in LOWER without a STAMP. On
# refusal nothing touches LOWER; CRYPT_STOPPED says, for the message, what stays down,
# and CRYPT_SERVICES which units to start once the key is there.
crypt_mount() {
	local lower=$1 upper=$2 key=$3 stamp=$4 out fek fnek want
	local -a sigs
	[[ -s $key ]] || die "no eCryptfs key: credential ${key##*/} is missing; $CRYPT_STOPPED (supply it at boot via SMBIOS type 11 or loader/credentials/${key##*/}.cred on the ESP, or now in /run/credstore/${key##*/}, then: systemctl start $CRYPT_SERVICES)"
	keyctl link @u @s
	# The passphrase goes through stdin only, never argv (visible in ps).
	out=$(ecryptfs-add-passphrase --fnek - <"$key")
	mapfile -t sigs < <(grep -o '\[[0-9a-f]\{16\}\]' <<<"$out" | tr -d '[]')
	[[ ${#sigs[@]} -eq 2 ]] || die "could not load the eCryptfs key into the kernel keyring: $out"
	fek=${sigs[0]} fnek=${sigs[1]}
	if [[ -e $stamp ]]; then
		want=$(<"$stamp")
		[[ $want == "$fek" ]] || die "wrong eCryptfs key: credential ${key##*/} has signature $fek but $lower was created with $want; $CRYPT_STOPPED"
	else
		[[ ! -d $lower || -z $(ls -A "$lower") ]] || die "$lower has data but no key signature record ($stamp); refusing to guess"
		echo "$fek" >"$stamp.tmp" && mv "$stamp.tmp" "$stamp"
		echo "new encrypted store $lower: recorded key signature $fek"
	fi
	install -d -m 0700 "$lower"
	install -d -m 0755 "$upper"
	mount -i -t ecryptfs "$lower" "$upper" -o "ecryptfs_sig=$fek,ecryptfs_fnek_sig=$fnek,ecryptfs_cipher=aes,ecryptfs_key_bytes=32,ecryptfs_unlink_sigs,nodev,nosuid,noexec"
}

# crypt_set_aside_unreadable QUEUE: before Postfix starts, moves every file of its queue
# directory QUEUE that cannot be opened into Postfix's corrupt queue, saying so. A power
# cut can leave a file whose eCryptfs header never reached the disk; the kernel then
# answers EIO for it forever, and qmgr stops at the first queue file it cannot open
# (msg_fatal): one such file would hold up every message behind it. Its key was in that
# header, so nothing of it can be read again; it stays for the operator to see.
crypt_set_aside_unreadable() {
	local queue=$1 f rel to
	while IFS= read -r -d '' f; do
		# (eCryptfs checks the header on open: the open alone tells)
		{ : <"$f"; } 2>/dev/null && continue
		rel=${f#"$queue"/} to=$queue/corrupt/${rel//\//_}
		mv --backup=numbered -- "$f" "$to"
		echo "queue file $rel cannot be read: its eCryptfs header is damaged (a power cut while it was written leaves it so); moved to $to so that Postfix delivers the rest. It holds nothing that can be read: delete it"
	done < <(find "$queue" -path "$queue/corrupt" -prune -o -type f -print0)
}
