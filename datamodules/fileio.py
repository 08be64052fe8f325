"""The one low-level I/O helper every package writes through: atomic files, atomic folder swaps, strict JSON.

Nothing the project writes is ever seen half-written: a file goes to a unique temporary name in the
target folder (same file system), is flushed and fsync'ed, then renamed over the target; a folder of
results is built beside its target and swapped in, so old files never sit beside new partial ones.
Results are readable by the group (mode 0644, not ``mkstemp``'s 0600). JSON is strict everywhere:
NaN and +-inf are written as ``null`` (there is no NaN in JSON), numpy scalars as numbers.

Written here rather than taken from a library: the candidates (``atomicwrites``, unmaintained;
``boltons.fileutils.atomic_save``) cover only the single file, not the folder swap or the JSON policy.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: permission bits of every file written here (owner rw, group and others r), whatever the umask of mkstemp
FILE_MODE = 0o644


def _fsync_dir(path: Path) -> None:
    """Makes a rename in ``path`` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_path(path: str | Path) -> Path:
    """A unique, hidden name beside ``path`` keeping its suffix (``.x.png`` -> cv2 / matplotlib pick the format)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp{path.suffix}")


def atomic_write(path: str | Path, data: bytes | str, mode: int = FILE_MODE) -> Path:
    """Writes ``data`` (text as UTF-8) to ``path`` atomically: unique temporary file in the same folder,
    fsync, rename. A reader sees the old file or the new one, never half; a failure leaves no temporary."""
    if isinstance(data, str):
        data = data.encode()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_with(path: str | Path, writer: Callable[[Path], Any], mode: int = FILE_MODE) -> Path:
    """For writers that need a file name (``cv2.imwrite``, ``fig.savefig``, ``np.save``): ``writer(tmp)``
    writes a unique temporary name with ``path``'s suffix, which is then renamed into place.

    A writer returning ``False`` (cv2's way of failing) raises ``OSError`` naming ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        if writer(tmp) is False or not tmp.is_file():
            raise OSError(f"could not write {path}")
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def json_safe(value: Any) -> Any:
    """Plain JSON data: mappings with string keys, lists, numbers, strings, bools, None.

    NaN / +-inf -> None (strict JSON has no NaN; undefined values are ``null`` in every file), numpy
    scalars and arrays -> Python numbers and lists, paths and anything else -> their ``str``.
    """
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_safe(v) for v in value]
    if hasattr(value, "tolist") and hasattr(value, "dtype"):  # numpy scalar or array
        return json_safe(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str | int | bool):
        return value
    return str(value)


def dumps_json(value: Any, indent: int | None = 2, sort_keys: bool = False) -> str:
    """Strict JSON text of ``value`` (see `json_safe`), ending in a newline when indented."""
    text = json.dumps(json_safe(value), indent=indent, sort_keys=sort_keys, allow_nan=False)
    return text + "\n" if indent is not None else text


def write_json(path: str | Path, value: Any, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """Writes ``value`` as strict JSON (NaN -> null), atomically."""
    return atomic_write(path, dumps_json(value, indent=indent, sort_keys=sort_keys))


def read_json(path: str | Path) -> Any:
    """Reads a JSON file; a missing, empty or damaged file raises ``ValueError`` naming it (one line)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: damaged JSON file ({type(err).__name__}: {err})") from None


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in blocks of 4 MiB: the checksum of caches and checkpoints."""
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def swap_directory(new: str | Path, target: str | Path) -> Path:
    """Puts the complete folder ``new`` in place of ``target`` (same parent); the old ``target`` is removed.

    Two renames: ``target`` -> hidden old name, ``new`` -> ``target``; then the old folder is deleted. A
    crash between them leaves no ``target`` at all (never a mix of old and new files), and the hidden old
    folder, which a later swap does not mistake for current results.
    """
    new, target = Path(new), Path(target)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:12]}")
        os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        if old is not None and not target.exists():
            os.rename(old, target)
        raise
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def pid_alive(pid: int) -> bool:
    """True while process ``pid`` exists (on this machine): its temporary files are not stale."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(target: str | Path) -> int:
    """Deletes the staging / old folders of ``target`` (``.<name>.new-<pid>-*``, ``.<name>.old-<pid>-*``) left by
    processes that were killed; returns how many."""
    target = Path(target)
    return sum(
        remove_dead_leftovers(target.parent, f".{target.name}.{kind}-*",
                              lambda name, kind=kind: name.split(f".{kind}-", 1)[1].split("-", 1)[0])
        for kind in ("new", "old")
    )


def remove_dead_leftovers(folder: str | Path, pattern: str, pid_of: Callable[[str], str | int]) -> int:
    """Deletes the entries of ``folder`` matching ``pattern`` whose writer (``pid_of(name)``) is no longer running."""
    removed = 0
    for path in Path(folder).glob(pattern):
        try:
            pid = int(pid_of(path.name))
        except (ValueError, IndexError):
            continue
        if pid != os.getpid() and not pid_alive(pid):
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed


def staging_directory(target: str | Path) -> Path:
    """A new empty hidden folder beside ``target`` to build its replacement in (see `swap_directory`); the
    leftovers of killed processes for the same target are removed first."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.new-{os.getpid()}-", dir=target.parent))


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """``with atomic_directory(out) as tmp:`` write into ``tmp``; on success it replaces ``out`` whole,
    on an exception it is deleted and ``out`` is left as it was."""
    target = Path(target)
    tmp = staging_directory(target)
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        swap_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_entries(staging: str | Path, target: str | Path, marker: str | None = None) -> list[Path]:
    """Moves every file and folder of ``staging`` into ``target`` (which may hold other things) as one unit.

    The ``marker`` (e.g. ``metrics.json``, the file that says "these results are current") is removed from
    ``target`` first and moved in last, so a crash in between leaves no marker beside a mix of old and new
    entries; folders are replaced with `swap_directory`, files with a rename. ``staging`` is removed.
    """
    staging, target = Path(staging), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    entries = sorted(p for p in staging.iterdir() if p.name != marker)
    if marker is not None:
        (target / marker).unlink(missing_ok=True)
    moved = []
    for entry in entries:
        dest = target / entry.name
        if entry.is_dir():
            swap_directory(entry, dest)
        else:
            os.replace(entry, dest)
        moved.append(dest)
    if marker is not None and (staging / marker).exists():
        os.replace(staging / marker, target / marker)
        moved.append(target / marker)
    _fsync_dir(target)
    shutil.rmtree(staging, ignore_errors=True)
    return moved
