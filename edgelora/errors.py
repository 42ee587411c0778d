"""The one exception type the CLI turns into a one-line message and exit code 2, and the exit
codes both CLIs share."""
from __future__ import annotations

import os
import signal
import sys
from typing import Callable


class UserError(Exception):
    """A mistake in the user's input (a file, a flag, a bundle): reported without a traceback."""


_signals: list[int] = []  # the stopping signal received, if any


def _stop(signum: int, frame) -> None:
    """The first SIGINT or SIGTERM stops the work as Ctrl-C does (a search keeps and writes its
    best weights); from then on both have their default action, so a second one ends the
    process at once, whatever it is doing (outputs are swapped in whole: nothing is half-written)."""
    _signals.append(signum)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise KeyboardInterrupt


def interrupted_exit_code() -> int:
    """128 + the signal that stopped us: 130 for Ctrl-C, 143 for SIGTERM (the shell's convention)."""
    return 128 + (_signals[0] if _signals else signal.SIGINT)


def run_command(prog: str, fn: Callable[[], int | None]) -> int:
    """Exit codes shared by both CLIs: 2 for a user mistake or a file that cannot be read or
    written (one line, no traceback), 130 for Ctrl-C and 143 for SIGTERM (whatever the command
    saved before it stopped stays saved), 141 when the reader of stdout went away (`edgelora
    info | head`): the shell's code for SIGPIPE, no traceback."""
    _signals.clear()
    handlers = {s: signal.signal(s, _stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = fn() or 0
        sys.stdout.flush()  # a closed pipe surfaces here, not in the interpreter's exit
        return code
    except UserError as e:
        print(f"{prog}: error: {e}".replace("\n", " "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return interrupted_exit_code()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit flush must not fail again
        return 141
    except OSError as e:  # a file that cannot be read or written: no room, no permission
        print(f"{prog}: error: {e.filename or ''}: {e.strerror or e}".replace("\n", " "), file=sys.stderr)
        return 2
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
