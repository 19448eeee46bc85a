"""The one base class of every error a user can fix by changing their input.

A recipe value, a data file, a benchmark name, a parallel layout or a checkpoint path that does
not work raises a subclass of :class:`UserError`, whose message names the file, row or key and the
fix. ``igrpo`` prints such an error as one line and exits with code 2; anything else is a bug and
keeps its traceback. It lives in ``config`` (the bottom of the package) so every layer can derive
from it.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input the user can fix (the message says which file, row or key, and how)."""


class LayoutError(UserError, ValueError):
    """The parallel layout does not fit the model or the number of processes."""
