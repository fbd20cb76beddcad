"""One error type for everything an operator can fix: a fact plus what to do about it."""
from __future__ import annotations


class ApplianceError(Exception):
    """An error the CLI prints without a traceback.

    `message` states the fact (file errors start with the path); `hint` says what to do.
    """

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class ConfigError(ApplianceError):
    """Bad input: a site file, a profile or a template. Nothing has been built."""

    exit_code = 2


class BuildError(ApplianceError):
    """mkosi or an in-image config checker failed."""

    exit_code = 3
