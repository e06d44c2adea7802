"""One exception type for every user-facing failure, and SIGTERM handled like Ctrl-C.

The CLI catches :class:`UserError`, prints its message on one line and exits non-zero, so
messages must speak the user's words ("ratio must be in [0, 1], got 1.5"), not a traceback.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator


class UserError(Exception):
    """Bad input or an impossible option: shown to the user as one line, exit code 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or torchrun's stop), raised like Ctrl-C so that every clean-up runs:
    temp dirs are removed and locks released instead of being left for the next run."""

    exit_code = 128 + signal.SIGTERM


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread.

    Not in a torchrun worker: Python runs a handler only between bytecodes, so a rank blocked in a
    collective would ignore torchrun's SIGTERM for its whole grace period; there SIGTERM keeps
    killing at once, and the trainer removes a killed save's temp dir when the run resumes.
    """
    if threading.current_thread() is not threading.main_thread() or "TORCHELASTIC_RUN_ID" in os.environ:
        yield
        return
    before = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def run_command(prog: str, body: Callable[[], int | None]) -> int:
    """Run a command's body under the project's exit policy: SIGTERM cleans up like Ctrl-C
    (:func:`sigterm_raises`), a :class:`UserError` is one line ``PROG: error: ...`` and exit 2,
    SIGTERM exits 143 and Ctrl-C 130, each with one line saying so."""
    try:
        with sigterm_raises():
            return int(body() or 0)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"{prog}: terminated", file=sys.stderr)
        return Terminated.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
