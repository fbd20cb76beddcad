"""Mail users' password hashes: SHA512-CRYPT through the host's libxcrypt.

Python 3.13 dropped the `crypt` module, which was a thin wrapper around the same C
library; calling libxcrypt (Debian's libcrypt1, essential on every Debian host) directly
keeps one maintained implementation, the one Dovecot's own `{SHA512-CRYPT}` verifies
against, and keeps every hash made before valid.
"""
from __future__ import annotations

import ctypes
import functools
import ctypes.util
import secrets as pysecrets

from .errors import ApplianceError

SCHEME = "SHA512-CRYPT"
PREFIX = "$6$"
ROUNDS = 200_000


@functools.lru_cache(maxsize=1)
def _libcrypt() -> ctypes.CDLL:
    name = ctypes.util.find_library("crypt") or "libcrypt.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        raise ApplianceError(f"cannot load libxcrypt ({name}) to hash mail users' passwords",
                             hint="install Debian's libcrypt1 (it is essential; the host is damaged)") from None
    lib.crypt.restype = ctypes.c_char_p
    lib.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    lib.crypt_gensalt.restype = ctypes.c_char_p
    lib.crypt_gensalt.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_int]
    return lib


def gensalt(prefix: str, rounds: int = 0) -> str:
    """A new setting for `prefix` ('$6$', '$2b$'...), salted from the kernel's random
    source by libxcrypt itself; rounds 0 means the scheme's default."""
    out = _libcrypt().crypt_gensalt(prefix.encode(), rounds, None, 0)
    if not out:
        raise ApplianceError(f"libxcrypt cannot make a salt for {prefix!r} with {rounds} rounds")
    return out.decode()


def crypt(password: str, setting: str) -> str:
    """crypt(3) of `password` with `setting` (a full hash verifies to itself)."""
    if "\0" in password:
        raise ApplianceError("a password cannot contain a NUL byte")
    out = _libcrypt().crypt(password.encode(), setting.encode())
    # libxcrypt returns a string starting with '*' on failure instead of NULL.
    if not out or out.startswith(b"*"):
        raise ApplianceError(f"libxcrypt refused the setting {setting.split('$')[1:2]}")
    return out.decode()


def hash_password(password: str, rounds: int = ROUNDS) -> str:
    """A Dovecot passdb value: '{SHA512-CRYPT}$6$rounds=N$salt$hash'."""
    hashed = crypt(password, gensalt(PREFIX, rounds))
    if not hashed.startswith(f"{PREFIX}rounds={rounds}$"):
        raise ApplianceError("libxcrypt returned a hash of another scheme than SHA512-CRYPT")
    return "{" + SCHEME + "}" + hashed


def verify(password: str, value: str) -> bool:
    """Whether `value` ('{SHA512-CRYPT}$6$...') is a hash of `password`."""
    prefix = "{" + SCHEME + "}"
    if not value.startswith(prefix):
        return False
    stored = value[len(prefix):]
    return pysecrets.compare_digest(crypt(password, stored), stored)
