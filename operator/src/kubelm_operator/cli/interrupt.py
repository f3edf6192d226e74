"""Ctrl-C ends `kubelm` within a few seconds whatever it is blocked in, and a second Ctrl-C ends it at once.

The first Ctrl-C unwinds as KeyboardInterrupt, so that `status --watch` leaves its last screen in place and
shows the cursor again. That unwinding writes, and a write to a terminal or pipe whose reader has stopped (a
stalled ssh link, a pager that reads no further) blocks for good: no second signal interrupts it, and a
handler that only returned would see Python retry the write (PEP 475). So the signal also starts a deadline
on a thread of its own, woken by the signal's wake-up byte rather than by Python code in the main thread,
which may be stuck in such a write or in a call that signals do not interrupt (a name lookup). The deadline
ends the process with INTERRUPTED unless the unwinding has ended it first.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import NoReturn

INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a program that Ctrl-C ended
GRACE_SECONDS = 3.0

# What the process ends with should the deadline pass once the command's own exit code is known and its
# output written: the rest of the way out (the interpreter's shutdown) writes nothing that could block.
_exit_code = INTERRUPTED


def install() -> None:
    """Call from the main thread before the command runs."""
    readable, writable = os.pipe()
    os.set_blocking(writable, False)  # the signal handler must never wait on it
    signal.set_wakeup_fd(writable, warn_on_full_buffer=False)
    signal.signal(signal.SIGINT, _interrupted)
    threading.Thread(target=_deadline, args=(readable,), name="interrupt-deadline", daemon=True).start()


def _interrupted(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    raise KeyboardInterrupt


def _deadline(wakeups: int) -> None:
    while (byte := os.read(wakeups, 1)) != bytes([signal.SIGINT]):
        if not byte:
            return
    time.sleep(GRACE_SECONDS)
    os._exit(_exit_code)


def leave(code: int) -> NoReturn:
    """sys.exit(code), with what is buffered written first. Left to the interpreter's shutdown, that write
    would run where the deadline's thread no longer can, and block for good on a stalled reader."""
    global _exit_code
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except KeyboardInterrupt:
        os._exit(INTERRUPTED)  # Ctrl-C while the output is stuck: what is left of it will not be read
    except (OSError, ValueError):
        pass  # a reader that went away: the interpreter reports it at exit, as it always has
    _exit_code = code
    sys.exit(code)
