"""Mail users' password hashes come from libxcrypt (no `crypt` module on Python 3.13)."""
import pytest

from appliance.errors import ApplianceError
from appliance.passwords import hash_password, verify

# Made by Python 3.11's crypt module (the builder before it dropped the module): a
# secrets directory written then must keep working.
OLD = ("{SHA512-CRYPT}$6$rounds=200000$M7ifU0BwdImxQBjS$zqD6MTFAHy.VyiYknAPn3fgXbdZIurxe."
       "T7RJdtPi7NjY87SG3iCOLexGcapNyI5bXjChxgP68CekQhuHaZ5r.")


def test_new_hashes_are_salted_sha512_crypt_that_verify():
    a, b = hash_password("s3cret pass"), hash_password("s3cret pass")
    assert a.startswith("{SHA512-CRYPT}$6$rounds=200000$") and len(a.split("$")[3]) == 16
    assert a != b  # a new salt each time
    assert verify("s3cret pass", a) and verify("s3cret pass", b)
    assert not verify("s3cret pasS", a)


def test_hashes_made_with_the_old_crypt_module_still_verify():
    assert verify("correct horse battery staple", OLD)
    assert not verify("correct horse battery stapler", OLD)


def test_a_nul_byte_is_refused_not_truncated():
    with pytest.raises(ApplianceError, match="NUL"):
        hash_password("abc\0def")
