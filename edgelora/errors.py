"""The one exception type the CLI turns into a one-line message and exit code 2."""
from __future__ import annotations

import os
import sys
from typing import Callable


class UserError(Exception):
    """A mistake in the user's input (a file, a flag, a bundle): reported without a traceback."""


def run_command(prog: str, fn: Callable[[], int | None]) -> int:
    """Exit codes shared by both CLIs: 2 for a user mistake (one line, no traceback), 130 for
    Ctrl-C (whatever the command saved before it stopped stays saved), 141 when the reader of
    stdout went away (`edgelora info | head`): the shell's code for SIGPIPE, no traceback."""
    try:
        code = fn() or 0
        sys.stdout.flush()  # a closed pipe surfaces here, not in the interpreter's exit
        return code
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit flush must not fail again
        return 141
