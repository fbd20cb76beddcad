"""The raw-disk scan the no-plaintext VM tests rest on: it reads only what a sparse copy
of a disk holds, and must still see every token written anywhere in the range."""
from __future__ import annotations

from tests.vm.mail import scan_raw

MiB = 1 << 20


def token(n: int) -> str:
    return f"tok{n:024x}"


def test_every_token_in_the_range_is_found_and_none_outside_it(tmp_path):
    raw = tmp_path / "disk.raw"
    placed = {
        token(1): 3 * MiB,                # in the first stretch of data
        token(2): 66 * MiB - 10,          # across the first 64 MiB read of it
        token(3): 130 * MiB + 4090,       # across a 4 KiB block boundary, after a hole
        token(4): 199 * MiB,              # beyond the range scanned below
        token(5): 1 * MiB,                # before it
    }
    with open(raw, "wb") as fh:
        fh.truncate(256 * MiB)  # holes everywhere else
        fh.seek(2 * MiB)
        fh.write(b"x" * (68 * MiB))  # one stretch of data longer than a read
        for tok, at in placed.items():
            fh.seek(at)
            fh.write(b"control " + tok.encode() + b" control")
    found, control = scan_raw(raw, 2 * MiB, 196 * MiB, list(placed), b"control")
    assert found == {token(1), token(2), token(3)}
    assert control == 6


def test_a_file_without_data_holds_nothing(tmp_path):
    raw = tmp_path / "empty.raw"
    with open(raw, "wb") as fh:
        fh.truncate(64 * MiB)
    assert scan_raw(raw, 0, 64 * MiB, [token(1)], b"control") == (set(), 0)
