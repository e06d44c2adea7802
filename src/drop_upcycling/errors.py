"""One exception type for every user-facing failure.

The CLI catches :class:`UserError`, prints its message on one line and exits non-zero, so
messages must speak the user's words ("ratio must be in [0, 1], got 1.5"), not a traceback.
"""


class UserError(Exception):
    """Bad input or an impossible option: shown to the user as one line, exit code 2."""
