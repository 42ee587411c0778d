"""What an `edgelora-export` command shows: one line per step with its seconds, and a progress bar
where a step is long. Everything the libraries underneath print or log (torch.onnx's progress,
onnxscript / onnx_ir logging, transformers' notices, Python warnings, the onnxruntime-genai
builder's print()s) goes to a log file, `EDGELORA_HOME/logs/export-<command>-<time>-<pid>.log`,
named in the last line; `--verbose` shows it live instead.

How: the handlers those libraries attached to their loggers are pointed at the log file
(logging's own `setStream`), and sys.stdout / sys.stderr are the log file while the command runs
(contextlib.redirect_*: plain print()s, tqdm bars, warnings and handlers made meanwhile land there).
Nothing is redirected at the file-descriptor level; all of it is undone when the command ends.
"""
from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Iterator

from edgelora.bundle import home
from edgelora.errors import UserError

_terminal: tuple = ()  # (stdout, stderr) of the terminal while output is captured; () when it is not


def stdout():
    return _terminal[0] if _terminal else sys.stdout


def stderr():
    """Where a progress bar goes: the terminal, also while the libraries' output is captured."""
    return _terminal[1] if _terminal else sys.stderr


def say(*args) -> None:
    """A step line: on the terminal, and in the log file when there is one."""
    print(*args, file=stdout(), flush=True)
    if _terminal:
        print(*args, file=sys.stdout, flush=True)


class Lap:
    """Seconds since the previous call (or since it was made), as a step line shows them."""

    def __init__(self):
        self.t = time.perf_counter()

    def __call__(self) -> str:
        now = time.perf_counter()
        seconds, self.t = now - self.t, now
        return f"{seconds:.1f}s"


def log_path(command: str) -> Path:
    return home() / "logs" / f"export-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


def _stream_handlers():
    loggers = [logging.getLogger()] + [l for l in list(logging.Logger.manager.loggerDict.values())
                                       if isinstance(l, logging.Logger)]
    for logger in loggers:
        for h in list(logger.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                yield h


@contextmanager
def captured(command: str, verbose: bool = False, prog: str = "edgelora-export") -> Iterator[Path | None]:
    """Run a command with the libraries' output in a log file (yields its path), or, `verbose`,
    as it comes (yields None). A UserError (or an unreadable file) leaves as one line naming the
    log; any other exception leaves its traceback in the log too."""
    global _terminal
    if verbose or _terminal:
        yield None
        return
    path = log_path(command)
    path.parent.mkdir(parents=True, exist_ok=True)
    out, err = sys.stdout, sys.stderr
    with open(path, "w", encoding="utf-8", errors="replace", buffering=1) as log:
        log.write(f"$ {prog} {' '.join(sys.argv[1:])}\n")
        terminal = {id(s) for s in (out, err, sys.__stdout__, sys.__stderr__) if s is not None}
        moved = [(h, h.stream) for h in _stream_handlers() if id(h.stream) in terminal]
        for h, _ in moved:
            h.setStream(log)
        _terminal = (out, err)
        try:
            with redirect_stdout(log), redirect_stderr(log):
                yield path
        except UserError as e:
            log.write(f"{prog}: error: {e}\n")
            raise UserError(f"{e} (log: {path})") from e
        except BrokenPipeError:
            raise
        except KeyboardInterrupt:
            print(f"log: {path}", file=out, flush=True)
            raise
        except OSError as e:  # as run_command words it, plus the log
            log.write(traceback.format_exc())
            raise UserError(f"{e.filename or ''}: {e.strerror or e} (log: {path})") from e
        except BaseException:
            log.write(traceback.format_exc())
            print(f"{prog}: failed; the full log: {path}", file=err, flush=True)
            raise
        else:
            print(f"log: {path}", file=out, flush=True)
        finally:
            _terminal = ()
            for h, stream in moved:
                h.setStream(stream)
            for h in _stream_handlers():  # made while captured (a basicConfig, transformers' handler)
                if h.stream is log:
                    h.setStream(err)
                if h.__dict__.get("flush") == log.flush:  # transformers binds sys.stderr.flush to its handler
                    del h.flush
