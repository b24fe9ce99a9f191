"""Errors that end a command with one clear line (file, row, field, fix) and exit code 2."""

from __future__ import annotations


class FedrecInputError(ValueError):
    """Bad input from a user file or flag. ``str(err)`` is the one-line message shown."""

    exit_code = 2


class BudgetExceeded(RuntimeError):
    """A release would exceed the institution's (ε, δ) cap; nothing was computed."""

    exit_code = 3
