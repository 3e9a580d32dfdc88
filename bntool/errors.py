"""Errors a user can cause. The CLI turns each into one line on stderr and an exit code."""

from __future__ import annotations


class BntoolError(Exception):
    """Bad usage or bad input: the message names the file, layer or key at fault and what to do."""

    exit_code = 2


class InputError(BntoolError):
    """A file, option or model that cannot be used as given."""


class UnsupportedError(BntoolError):
    """The input is valid but this operation does not support it."""


class CheckFailed(BntoolError):
    """A check ran and failed (e.g. outputs differ beyond tolerance)."""

    exit_code = 1
