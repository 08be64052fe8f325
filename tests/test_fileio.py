"""datamodules.fileio: atomic files (mode, clean-up), folder swaps, publishing a result set, strict JSON."""

from __future__ import annotations

import json
import math
import stat
from pathlib import Path

import numpy as np
import pytest

from datamodules import fileio


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_write_replaces_whole_file_group_readable_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "metrics.json"
    fileio.atomic_write(target, "old")
    fileio.atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert _mode(target) == 0o644  # not mkstemp's 0600
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]


def test_atomic_write_failure_keeps_old_file_and_removes_temporary(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "a.txt"
    fileio.atomic_write(target, "old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(fileio.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        fileio.atomic_write(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_write_with_keeps_suffix_and_reports_failing_writer(tmp_path: Path) -> None:
    target = tmp_path / "map.npy"
    seen = []

    def writer(tmp: Path) -> None:
        seen.append(tmp)
        np.save(tmp, np.arange(3))

    fileio.atomic_write_with(target, writer)
    assert seen[0].suffix == ".npy" and seen[0].parent == tmp_path and seen[0].name.startswith(".")
    np.testing.assert_array_equal(np.load(target), np.arange(3))
    assert _mode(target) == 0o644
    with pytest.raises(OSError, match="could not write .*x.png"):
        fileio.atomic_write_with(tmp_path / "x.png", lambda tmp: False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.npy"]


def test_temporary_names_are_unique() -> None:
    names = {fileio.temporary_path("/x/fig.png") for _ in range(100)}
    assert len(names) == 100


def test_json_nan_and_inf_are_null_everywhere_and_numpy_is_plain(tmp_path: Path) -> None:
    value = {"a": math.nan, "b": [np.float32(1.5), -math.inf], "c": np.int64(3), 4: np.array([1, 2]),
             "p": tmp_path, "t": (True, None)}
    path = fileio.write_json(tmp_path / "x.json", value, sort_keys=True)
    assert json.loads(path.read_text()) == {"a": None, "b": [1.5, None], "c": 3, "4": [1, 2],
                                            "p": str(tmp_path), "t": [True, None]}
    assert "NaN" not in path.read_text() and path.read_text().endswith("\n")
    assert fileio.dumps_json({"x": float("nan")}, indent=None) == '{"x": null}'


def test_read_json_names_a_damaged_file(tmp_path: Path) -> None:
    bad = tmp_path / "DONE.json"
    bad.write_text('{"truncated": ')
    with pytest.raises(ValueError, match=r"DONE.json: damaged JSON file"):
        fileio.read_json(bad)
    with pytest.raises(FileNotFoundError):
        fileio.read_json(tmp_path / "missing.json")


def test_atomic_directory_replaces_whole_folder_or_leaves_it(tmp_path: Path) -> None:
    target = tmp_path / "maps"
    target.mkdir()
    (target / "old.npz").write_text("old")
    with fileio.atomic_directory(target) as tmp:
        (tmp / "new.npz").write_text("new")
        assert not (target / "new.npz").exists()  # nothing visible before the swap
    assert [p.name for p in target.iterdir()] == ["new.npz"]
    with pytest.raises(RuntimeError), fileio.atomic_directory(target) as tmp:
        (tmp / "partial.npz").write_text("half")
        raise RuntimeError("crash mid-build")
    assert [p.name for p in target.iterdir()] == ["new.npz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps"]  # no staging or old folder left


def test_swap_directory_restores_the_old_folder_when_the_second_rename_fails(tmp_path: Path, monkeypatch) -> None:
    target, new = tmp_path / "cache", tmp_path / "new"
    target.mkdir()
    (target / "a").write_text("old")
    new.mkdir()
    real_rename = fileio.os.rename

    def rename(src, dst):
        if Path(src) == new:
            raise OSError("boom")
        real_rename(src, dst)

    monkeypatch.setattr(fileio.os, "rename", rename)
    with pytest.raises(OSError):
        fileio.swap_directory(new, target)
    assert (target / "a").read_text() == "old"


def test_publish_entries_moves_a_result_set_marker_last(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "results"
    (out / "maps").mkdir(parents=True)
    (out / "maps" / "old.npz").write_text("old")
    (out / "metrics.json").write_text("old")
    (out / "predictions").mkdir()  # not part of the result set: kept
    staging = fileio.staging_directory(out / "test")
    (staging / "maps").mkdir()
    (staging / "maps" / "new.npz").write_text("new")
    (staging / "metrics.json").write_text("new")
    (staging / "per_image.csv").write_text("new")
    order = []
    real = fileio.os.replace
    monkeypatch.setattr(fileio.os, "replace", lambda a, b: (order.append(Path(b).name), real(a, b)))
    fileio.publish_entries(staging, out, marker="metrics.json")
    assert order[-1] == "metrics.json"
    assert sorted(p.name for p in out.iterdir()) == ["maps", "metrics.json", "per_image.csv", "predictions"]
    assert [p.name for p in (out / "maps").iterdir()] == ["new.npz"]
    assert (out / "metrics.json").read_text() == "new"
    assert not staging.exists()


def test_staging_leftovers_of_killed_processes_are_removed(tmp_path: Path) -> None:
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    target = tmp_path / "results"
    (tmp_path / f".results.new-{dead_pid}-abc").mkdir()
    (tmp_path / f".results.old-{dead_pid}-def").mkdir()
    alive = tmp_path / f".results.new-{fileio.os.getpid()}-mine"
    alive.mkdir()
    staging = fileio.staging_directory(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, staging.name])
