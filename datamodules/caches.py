"""The one cache-building skeleton every on-disk cache of the data layer uses (patches, evaluation items).

A cache is a folder named by a hash of every parameter that shapes it (`cache_key`), holding its files and a
``DONE.json`` written last (parameters, listing, skipped files, a SHA-256 per data file). `CacheFolder`:
reuse a sound folder (`open_verified`: a damaged one is named in a warning and rebuilt); otherwise build
under ``.<name>.tmp-<pid>`` (`CacheFolder.building`), checksum and mark it (`CacheFolder.publish`) and
swap it in atomically (`publish_cache`, `fileio.swap_directory`), so an interrupted build never looks
complete. `readable` feeds a build its records, skipping (logged and counted) the ones that cannot be read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Generic, TypeVar

from pytorch_lightning.utilities import rank_zero_warn

from datamodules.fileio import file_sha256, remove_dead_leftovers, swap_directory, write_json
from datamodules.records import DataError, ImageRecord

log = logging.getLogger(__name__)

T = TypeVar("T")
V = TypeVar("V")


def listing_fingerprint(records: Sequence[ImageRecord]) -> str:
    """Hash of what a listing points at: ids, patients, paths, file sizes and modification times."""
    h = hashlib.sha256()
    for r in records:
        try:
            st = os.stat(r.path)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"{r.image_id}|{r.patient_id}|{r.path}|{r.label}|{r.spacing_mm}|{stamp}\n".encode())
    return h.hexdigest()


def cache_key(params: dict[str, Any]) -> str:
    """Short stable hash of a JSON-able parameter dict."""
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def open_verified(path: Path, opener: Callable[[Path], Any], what: str) -> Any | None:
    """``opener(path)`` for a cache that exists, or None (after one warning naming the damaged file) when it
    fails verification, so the caller rebuilds it; None too when there is no cache yet."""
    if not path.exists():
        return None
    try:
        return opener(path)
    except DataError as err:
        rank_zero_warn(f"{what} damaged, rebuilding it: {err}")
        return None


def publish_cache(tmp: Path, final: Path, opener: Callable[[Path], Any]) -> None:
    """Puts a freshly built cache folder ``tmp`` at ``final``: swapped in when ``final`` is absent or damaged;
    dropped when another process (e.g. another DDP rank) published a sound one first, whose files may be open."""
    if final.exists():
        try:
            opener(final)
        except DataError:
            pass
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            return
    swap_directory(tmp, final)


def remove_stale_builds(cache_root: Path, prefix: str) -> int:
    """Deletes ``.<prefix>.tmp-<pid>`` folders left by killed builds (their pid is gone); returns the count."""
    return remove_dead_leftovers(cache_root, f".{prefix}.tmp-*", lambda name: name.rsplit("-", 1)[1])


def with_progress(iterable: Any, total: int | None, desc: str, enabled: bool = True, every_s: float = 30.0,
             stream: Any = None) -> Any:
    """``iterable`` with progress: a tqdm bar on a terminal; plain ``desc: k/total`` lines every ``every_s``
    seconds and at the end otherwise (a bar written to a log file is one line of carriage returns)."""
    if not enabled:
        return iterable
    stream = stream if stream is not None else sys.stderr
    if hasattr(stream, "isatty") and stream.isatty():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit="img", file=stream)
    return _plain_progress(iterable, total, desc, every_s, stream)


def _plain_progress(iterable: Any, total: int | None, desc: str, every_s: float, stream: Any) -> Any:
    start = last = time.monotonic()
    done = 0
    of = f"/{total}" if total else ""
    for done, value in enumerate(iterable, start=1):
        yield value
        now = time.monotonic()
        if now - last >= every_s:
            last = now
            print(f"{desc}: {done}{of} ({now - start:.0f} s)", file=stream, flush=True)
    print(f"{desc}: {done}{of} done ({time.monotonic() - start:.0f} s)", file=stream, flush=True)



def readable(
    records: Sequence[ImageRecord], prepare: Callable[[ImageRecord], V], skipped: list[dict[str, str]],
    desc: str, progress: bool = True,
) -> Iterator[tuple[ImageRecord, V]]:
    """``(record, prepare(record))`` for every record that can be read, with progress; a record whose
    ``prepare`` raises is logged with its path, appended to ``skipped`` (path, error) and left out, never
    fatal mid-build. Interrupts (``KeyboardInterrupt``) pass through."""
    for record in with_progress(records, len(records), desc, progress):
        try:
            value = prepare(record)
        except Exception as err:  # noqa: BLE001 - a bad file is reported and skipped, never fatal
            log.warning("skipped unreadable image %s: %s", record.path, err)
            skipped.append({"path": str(record.path), "error": str(err)})
            continue
        yield record, value


class CacheFolder(Generic[T]):
    """``<root>/<prefix>-<key>``: the cache of one parameter set, opened by ``opener`` (which raises
    `DataError` naming a damaged file)."""

    def __init__(self, root: str | Path, prefix: str, params: dict[str, Any], opener: Callable[[Path], T],
                 what: str) -> None:
        self.root = Path(root)
        self.key = cache_key(params)
        self.name = f"{prefix}-{self.key}"
        self.path = self.root / self.name
        self.opener = opener
        self.what = what

    def reuse(self) -> T | None:
        """The opened cache when a sound one exists; None when there is none or it is damaged (warned)."""
        return open_verified(self.path, self.opener, self.what)

    @contextmanager
    def building(self) -> Iterator[Path]:
        """``with folder.building() as tmp:`` write the cache's files into ``tmp`` and end with `publish`; on
        any exception (interrupts included) ``tmp`` is deleted and nothing is published. Leftovers of
        killed builds of this key are removed first."""
        self.root.mkdir(parents=True, exist_ok=True)
        remove_stale_builds(self.root, self.name)
        tmp = self.root / f".{self.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def publish(self, tmp: Path, info: dict[str, Any], checksummed: Iterable[str]) -> None:
        """Adds the SHA-256 of each ``checksummed`` file to ``info``, writes it as ``DONE.json`` (last) and
        swaps ``tmp`` in at `path` (`publish_cache`)."""
        info["sha256"] = {name: file_sha256(tmp / name) for name in checksummed}
        write_json(tmp / "DONE.json", info, indent=1)
        publish_cache(tmp, self.path, self.opener)
