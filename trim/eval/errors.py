"""Errors of `trim eval`, beside the shared ones in `trim.errors`."""

from __future__ import annotations

from trim.errors import TrimError


class EvalError(TrimError):
    """The evaluation could not give a trustworthy result (lost samples, a rank failed, ...)."""


class OutputError(TrimError):
    """The results folder cannot be written (found before any work starts)."""


class FileFormatError(TrimError, ValueError):
    """A results / annotation / predictions / labels file is unreadable, in the wrong format, or
    does not match the file it is scored against; the message names the file and the entry."""
