"""Files in and out: outputs written whole or not at all, one writer at a time, readable as the umask
says; JSON read with one-line errors; file hashes; the cache folder.

Every command writes through these few functions, so the rules hold everywhere:

- :func:`atomic_dir` builds a folder in a hidden temp dir beside it and renames it at the end; an
  error, Ctrl-C or SIGTERM removes the temp dir (:func:`drop_upcycling.errors.sigterm_raises`);
  :func:`atomic_file`, :func:`write_text` and :func:`write_json` do the same for one file.
- :func:`claim` holds an exclusive lock (``.NAME.lock`` beside the output, ``flock`` + pid and
  host) while a folder is written: a second writer stops with one line naming the first instead of
  silently replacing its output. The kernel drops the lock of a killed process, so a stale lock file
  never blocks anyone; the next claim or :func:`remove_orphans` deletes it.
- Temp names carry ``PID@HOST`` (:func:`temp_dir`), so :func:`remove_orphans` can delete what a
  SIGKILLed process left behind, and only that.
- ``mkdtemp`` makes 0700 dirs and safetensors 0600 files; :func:`apply_umask` gives the finished
  output the modes a plain ``mkdir``/``open`` would have (other users of a cluster may read it).
- :func:`writing` turns operating-system errors at the output (read-only, not a folder, disk full)
  into one :class:`~drop_upcycling.errors.UserError` line with the path and the reason.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import UserError

log = logging.getLogger(__name__)
ENV_CACHE = "DROP_UPCYCLING_CACHE"
LOCK_MARK = "drop-upcycling"
# ".NAME.tmp-PID@HOST-xxxxxxxx" (mkdtemp/mkstemp's random suffix is 8 of [a-z0-9_]); ".old-" for trash.
_TEMP = re.compile(r"^\..+\.(?:tmp|old)-(\d+)@(.+)-[a-z0-9_]{8}$")
# Errors that say the destination cannot take the data, whatever file they name.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


# ---------------------------------------------------------------------------- errors
def _is_within(name: str | bytes | None, roots: list[Path]) -> bool:
    if not isinstance(name, str):
        return False
    path = Path(name).absolute()
    return any(path == r or r in path.parents for r in roots)


@contextlib.contextmanager
def writing(path: str | Path, roots: list[Path] | None = None) -> Iterator[None]:
    """Turn an :class:`OSError` of writing ``path`` into a one-line UserError with the path and reason.

    With ``roots``, only errors that are about writing (disk full, read-only, quota) or that name a
    file under one of ``roots`` are converted; others (a source that cannot be read) pass through.
    """
    try:
        yield
    except OSError as e:
        if roots is not None and e.errno not in _WRITE_ERRNOS and not _is_within(e.filename,
                                                                                  [r.absolute() for r in roots]):
            raise
        where = f" ({e.filename})" if isinstance(e.filename, str) and e.filename != str(path) else ""
        raise UserError(f"cannot write {path}: {e.strerror or e}{where}") from None


def refusal(out: str | Path, overwrite: bool = False) -> str | None:
    """Why writing ``out`` would be refused (it exists, another process holds it, its parent is not
    a writable folder), or None. :func:`atomic_dir` raises these same messages."""
    out = Path(out)
    if out.exists() and not overwrite:
        return f"{out} already exists (pass --overwrite to replace it)"
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                return f"cannot write {out}: {parent} is a file, not a folder"
            if not os.access(parent, os.W_OK | os.X_OK):
                return f"cannot write {out}: {parent} is not writable"
            break
    holder = lock_holder(out)
    return None if holder is None else _busy(out, holder)


# ---------------------------------------------------------------------------- locks
def lock_path(path: Path) -> Path:
    return path.parent / f".{path.name}.lock"


def _busy(path: Path, holder: str) -> str:
    return f"{path} is being written by {holder} (lock {lock_path(path)}); wait for it to finish or use another output"


def _try_flock(fd: int) -> bool | None:
    """True: locked; False: someone else holds it; None: the filesystem has no flock (Lustre mounted
    without -o flock, some FUSE)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in _NO_FLOCK:
            return None
        raise
    return True


def _holder(lock: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        mark, pid, host, *what = lock.read_text().split()
        if mark == LOCK_MARK:
            return f"process {pid} on {host}" + (f" ({' '.join(what)})" if what else "")
    return "another process"


def lock_holder(path: Path) -> str | None:
    """Who holds ``path``'s lock ("process 12 on node3 (upcycle)"), or None when nobody does."""
    lock = lock_path(Path(path))
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return None if _try_flock(fd) is not False else _holder(lock)
    finally:
        os.close(fd)  # closing drops our probe lock too


@contextlib.contextmanager
def claim(path: str | Path, what: str = "") -> Iterator[None]:
    """Hold ``path`` exclusively for the block, or raise a UserError naming the process that holds it.

    The lock file is created beside ``path`` and removed on exit. Whoever unlinks it holds its lock,
    and a new holder checks after locking that the file it locked is still the one at that name, so
    the unlink cannot let two processes in.
    """
    path = Path(path)
    lock = lock_path(path)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        locked = _try_flock(fd)
        if locked is None:
            log.warning("%s: the filesystem has no file locks; a concurrent writer would not be detected", lock)
            break
        if not locked:
            os.close(fd)
            raise UserError(_busy(path, _holder(lock)))
        try:
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{LOCK_MARK} {os.getpid()} {socket.gethostname()} {what}\n".encode())
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


# ---------------------------------------------------------------------------- temp names and orphans
def _tag() -> str:
    return f"{os.getpid()}@{socket.gethostname()}"


def temp_dir(dest: Path) -> Path:
    """A new hidden dir beside ``dest`` whose name records this process (for :func:`remove_orphans`)."""
    return Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-{_tag()}-", dir=dest.parent))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_orphans(folder: str | Path, everything: bool = False) -> list[Path]:
    """Delete the temp dirs, temp files and lock files in ``folder`` that dead processes left behind.

    Only names this module makes are considered, and only those of processes on this host that are
    gone (a pid cannot be judged on another host). ``everything=True`` is for a caller that holds the
    folder's own lock (a training run's checkpoints): then every temp in it is an orphan.
    """
    folder, host, removed = Path(folder), socket.gethostname(), []
    try:
        entries = [p for p in folder.iterdir() if p.name.startswith(".")]
    except OSError:
        return removed
    for p in entries:
        if p.name.endswith(".lock"):
            if _remove_free_lock(p):
                removed.append(p)
            continue
        if ".tmp-" not in p.name and ".old-" not in p.name:
            continue
        owner = _owner(p)
        if everything or (owner is not None and owner[1] == host and owner[0] != os.getpid()
                          and not _alive(owner[0])):
            _remove(p)
            removed.append(p)
    return removed


def _owner(p: Path) -> tuple[int, str] | None:
    """(pid, host) of a temp entry: from its name, or from an ``owner`` file (``HOST PID``) inside it."""
    m = _TEMP.match(p.name)
    if m is not None:
        return int(m.group(1)), m.group(2)
    try:
        host, pid = (p / "owner").read_text().split()
        return int(pid), host
    except (OSError, ValueError):
        return None  # no owner file yet (just created), or not ours to judge


def _remove_free_lock(lock: Path) -> bool:
    """Unlink one of our lock files if nobody holds it (we hold it while unlinking, see :func:`claim`)."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if not lock.read_text().startswith(LOCK_MARK) or not _try_flock(fd):
            return False  # not ours, held, or no flock here (then nobody can tell it is stale)
        lock.unlink()
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- modes
def umask() -> int:
    """The process umask, read without changing it where Linux allows."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the modes mkdir/open would give it.

    ``mkdtemp`` makes 0700 folders, ``mkstemp`` and safetensors 0600 files, whatever the umask; a
    checkpoint shared on a cluster must be readable by whom the user's umask allows.
    """
    mask = umask()
    items = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in items:
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            continue
        full = 0o777 if stat.S_ISDIR(st.st_mode) or st.st_mode & 0o111 else 0o666
        os.chmod(p, full & ~mask)


# ---------------------------------------------------------------------------- atomic writes
def _check_parent(out: Path) -> None:
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"cannot write {out}: {parent} is a file, not a folder")
            return


def make_parent(out: Path) -> None:
    """Create ``out``'s parent folders, with a one-line error when that is impossible."""
    _check_parent(out)
    with writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False, what: str = "") -> Iterator[Path]:
    """Yield a temp dir beside ``out``; on success it replaces ``out``, on any error it is removed.

    ``out`` is claimed (:func:`claim`) for the whole block, and its existence is checked under the
    claim, so of two concurrent writers one fails with a clear line. Orphans of killed writers in
    the same folder are removed first.
    """
    out = Path(out)
    make_parent(out)
    remove_orphans(out.parent)
    with contextlib.ExitStack() as stack:
        with writing(out):
            stack.enter_context(claim(out, what))
        if out.exists() and not overwrite:
            raise UserError(f"{out} already exists (pass --overwrite to replace it)")
        with writing(out):
            tmp = temp_dir(out)
        try:
            with writing(out, roots=[tmp, out]):
                yield tmp
                apply_umask(tmp)
                _replace(tmp, out)
        except BaseException:
            _remove(tmp)
            raise


def _replace(tmp: Path, out: Path) -> None:
    if not (out.exists() or out.is_symlink()):
        tmp.rename(out)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{_tag()}-", dir=out.parent))
    trash = trash / out.name  # the old output moves into a trash dir, so files and folders alike
    out.rename(trash)
    tmp.rename(out)
    _remove(trash.parent)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temp file name beside ``path``; on success it replaces ``path`` (a reader never sees
    half a file), on any error it is removed. For writers that want a file name (pandas, savefig)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-{_tag()}-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        apply_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def write_text(path: str | Path, text: str) -> Path:
    """Write a small text file atomically (:func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, data: object) -> None:
    """:func:`write_text` of ``data`` as indented JSON."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


# ---------------------------------------------------------------------------- reading
def cache_root() -> Path:
    """Base of every cache this package writes: ``$DROP_UPCYCLING_CACHE`` or ``~/.cache/drop_upcycling``."""
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "drop_upcycling").expanduser()


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (corpus files, tokenizers, configs in provenance)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_json(path: str | Path) -> Any:
    """Read a JSON file; a missing or malformed file is a :class:`UserError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None


def truncate_jsonl(path: Path, step: int) -> None:
    """Drop the rows of a per-step JSON-lines log written after ``step`` (a run resuming from the
    checkpoint of ``step``: a killed run may have logged further)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    write_text(path, "".join(line + "\n" for line in keep))


def jsonable(x: Any) -> Any:
    """``x`` as strict JSON values: NaN and infinities -> None, numpy scalars -> Python numbers, tuples
    -> lists, keys -> str (reports and analyses write their numbers through it)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if type(x).__module__ == "numpy" and hasattr(x, "item"):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
