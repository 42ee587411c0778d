"""Atomic writes, whole-folder swaps and hashes (an output is either the old one or the whole
new one), JSON read as user input, and the peak memory a report quotes."""
from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .errors import UserError


def user_mode(folder: bool = False) -> int:
    """The mode a plain mkdir or open would give under the user's umask: tempfile's private 0700
    and 0600 (and onnx's for external data) are not what an output should keep."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if folder else 0o666) & ~mask


@contextmanager
def writing(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path`, for a library that writes a file itself (gguf,
    onnxruntime); synced and renamed over `path` when the block ends, removed if it fails, so
    `path` is the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, user_mode())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write(path: str | Path, data: bytes | str) -> None:
    with writing(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def parse_json(text: str, path: str | Path, line: int | None = None):
    """json.loads for text a user wrote: NaN and Infinity are refused (Python's json takes them,
    the standard does not), and every failure, deep nesting and huge numbers included, is a
    UserError naming the file and line."""
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{line or e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    except (ValueError, RecursionError) as e:
        where = f"{path}:{line}" if line else str(path)
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e).split(";")[0]
        raise UserError(f"{where}: not valid JSON ({reason})") from None


def read_text(path: Path) -> str:
    """A user's text file, with or without a UTF-8 byte-order mark; one line if it cannot be read."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_json(path: str | Path) -> dict:
    """A JSON object from a file that may be missing, damaged or edited by hand."""
    path = Path(path)
    text = read_text(path)
    obj = parse_json(text, path)
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def check_writable(dst: Path, what: str) -> None:
    """Refuse, before any work, an output path whose nearest existing parent is not a writable folder."""
    parent = next(p for p in dst.absolute().parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UserError(f"{dst}: cannot write here ({parent} is not a writable folder); choose another {what}")


def check_replaceable(dst: Path, is_ours: Callable[[Path], bool], what: str, force: bool | None = None) -> None:
    """Refuse to replace anything but a missing path, an empty folder or one of our own outputs
    (`is_ours`): a folder a user points -o/--out at by mistake is never wiped. `force` (where a
    command has --force: False or True) replaces any folder."""
    if dst.is_symlink() or (dst.exists() and not dst.is_dir()):
        raise UserError(f"{dst}: exists and is not a folder; choose another {what}")
    check_writable(dst, what)
    if dst.is_dir() and not force and any(dst.iterdir()) and not is_ours(dst):
        raise UserError(f"{dst}: a folder that is not an edgelora output, left untouched; "
                        f"choose another {what}" + (" or empty it" if force is None else " or add --force to replace it"))


def check_file_replaceable(dst: Path, is_ours: Callable[[Path], bool], what: str, force: bool = False) -> None:
    """Refuse, before any work, to write a file over one edgelora did not write (the base GGUF a
    user hands llama.cpp, their notes): only a missing path or one of our own outputs (`is_ours`)
    is replaced, anything else only with --force. A folder is never replaced by a file."""
    if dst.is_dir():
        raise UserError(f"{dst}: is a folder; {what} names the file to write")
    check_writable(dst, what)
    if not force and (dst.exists() or dst.is_symlink()) and (dst.is_symlink() or not is_ours(dst)):
        raise UserError(f"{dst}: exists and was not written by edgelora, left untouched; "
                        f"choose another {what} or add --force to replace it")


def is_json_with(path: Path, keys: set[str]) -> bool:
    """Whether `path` holds a JSON object with every one of `keys` (an output we wrote)."""
    try:
        return keys <= read_json(path).keys()
    except UserError:
        return False


def replace_dir(new: Path, dst: Path) -> None:
    """Put the finished folder `new` at `dst`: the old one is renamed aside, the new one renamed in,
    then the old one deleted. A process killed at any moment leaves `dst` as the old complete
    folder, absent (the old one kept beside it as .<name>.*.old), or the new complete folder. The
    old one is renamed .gone before it is deleted, so a .old folder is always whole."""
    if dst.exists():
        stem = f".{dst.name}.{uuid.uuid4().hex[:8]}"
        old, gone = dst.with_name(f"{stem}.old"), dst.with_name(f"{stem}.gone")
        os.rename(dst, old)
        os.rename(new, dst)
        os.rename(old, gone)
        shutil.rmtree(gone)
    else:
        os.rename(new, dst)


def _locked(folder: Path) -> int | None:
    """An open descriptor holding `folder`'s exclusive lock, or None if another process holds it.
    The lock follows the folder through renames and dies with its process, even by kill -9."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except OSError:
        os.close(fd)
        return None


def tidy_beside(dst: Path) -> None:
    """Clear what killed runs left beside `dst`: temporary folders no live process holds the lock
    of are deleted; a previous output renamed aside by `replace_dir` is put back where `dst` is
    missing (the run died between its two renames), and deleted where `dst` is there; one a run
    died deleting (.gone) is deleted."""
    for gone in dst.parent.glob(f".{glob.escape(dst.name)}.*.gone"):
        shutil.rmtree(gone, ignore_errors=True)
    for tmp in dst.parent.glob(f".{glob.escape(dst.name)}.*.tmp"):
        fd = _locked(tmp)
        if fd is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            os.close(fd)
    for old in sorted(dst.parent.glob(f".{glob.escape(dst.name)}.*.old")):
        if dst.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(old, dst)


@contextmanager
def exclusive(lock_file: Path, busy: str) -> Iterator[None]:
    """Hold `lock_file`'s exclusive lock for the block (it dies with the process, even by kill -9);
    a UserError saying `busy` where another process holds it."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(busy) from None
        yield
    finally:
        os.close(fd)


# tempfile.mkdtemp's names: the prefix, then 8 of these characters (tempfile._RandomNameSequence)
MKDTEMP_TAIL = re.compile(r"[a-z0-9_]{8}")


def tidy_temp_folders(dst: Path, contents: set[str]) -> list[Path]:
    """Delete what killed runs left beside `dst`: folders named as tempfile.mkdtemp(prefix=".<name>.")
    names them and holding nothing but `contents`. Only a caller that holds the lock every writer
    of `dst` holds may call it: no live run's folder is then among them."""
    removed = []
    for p in dst.parent.glob(f".{glob.escape(dst.name)}.*"):
        tail = p.name[len(dst.name) + 2:]
        if (MKDTEMP_TAIL.fullmatch(tail) and p.is_dir() and not p.is_symlink()
                and {c.name for c in p.iterdir()} <= contents):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@contextmanager
def building(dst: Path, failed: str = "it is left as it was") -> Iterator[Path]:
    """A temporary folder beside `dst` to build an output in; it replaces `dst` whole when the
    block ends, and is removed if the block fails. A failed write (no permission, disk full) is
    a UserError naming the folder and ending with `failed`: `dst` is left as it was."""
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tidy_beside(dst)
        tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp"))
        os.chmod(tmp, user_mode(folder=True))
        lock = _locked(tmp)
    except OSError as e:
        raise UserError(f"{dst}: cannot write here ({e.strerror})") from None
    try:
        yield tmp
        replace_dir(tmp, dst)
    except OSError as e:
        raise UserError(f"{dst}: cannot write the output ({e.strerror or e}); {failed}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if lock is not None:
            os.close(lock)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def peak_rss_mb(reset: bool = False) -> float:
    """This process's peak RSS (VmHWM; ru_maxrss carries a parent's peak across exec).
    `reset` starts a new peak (Linux clear_refs), so one long process can report per task."""
    if reset:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
