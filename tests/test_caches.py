"""The one cache skeleton (`datamodules.caches`): build once, reuse, rebuild when damaged, never half."""

from __future__ import annotations

from pathlib import Path

import pytest

from datamodules.caches import CacheFolder, readable
from datamodules.fileio import file_sha256, read_json
from datamodules.records import DataError, ImageRecord


def open_words(path: Path) -> str:
    info = read_json(path / "DONE.json") if (path / "DONE.json").is_file() else None
    if info is None:
        raise DataError(f"{path / 'DONE.json'}: missing")
    if file_sha256(path / "words.txt") != info["sha256"]["words.txt"]:
        raise DataError(f"{path / 'words.txt'}: checksum differs")
    return (path / "words.txt").read_text()


def build(root: Path, params: dict, text: str = "a b c") -> tuple[str, bool]:
    folder = CacheFolder(root, "words", params, open_words, "word cache")
    reused = folder.reuse()
    if reused is not None:
        return reused, True
    with folder.building() as tmp:
        (tmp / "words.txt").write_text(text)
        folder.publish(tmp, {"key": folder.key, "params": params}, ["words.txt"])
    return open_words(folder.path), False


def test_built_once_reused_keyed_by_params_and_rebuilt_when_damaged(tmp_path: Path) -> None:
    assert build(tmp_path, {"n": 1}) == ("a b c", False)
    assert build(tmp_path, {"n": 1}, text="other") == ("a b c", True)  # reused: nothing rebuilt
    folder = CacheFolder(tmp_path, "words", {"n": 1}, open_words, "word cache")
    assert folder.path.name == f"words-{folder.key}" and read_json(folder.path / "DONE.json")["params"] == {"n": 1}
    assert build(tmp_path, {"n": 2}) == ("a b c", False) and len(list(tmp_path.glob("words-*"))) == 2
    (folder.path / "words.txt").write_text("overwritten")
    with pytest.warns(UserWarning, match=rf"word cache damaged, rebuilding it: {folder.path / 'words.txt'}: checksum"):
        assert build(tmp_path, {"n": 1}, text="x y") == ("x y", False)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_an_interrupted_build_leaves_nothing_and_publishes_nothing(tmp_path: Path) -> None:
    folder = CacheFolder(tmp_path, "words", {"n": 1}, open_words, "word cache")
    with pytest.raises(KeyboardInterrupt), folder.building() as tmp:
        (tmp / "words.txt").write_text("half")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == [] and folder.reuse() is None


def test_readable_skips_and_counts_what_cannot_be_read(tmp_path: Path, caplog) -> None:
    records = [ImageRecord(f"i{k}", "p", tmp_path / f"i{k}.png", "image") for k in range(4)]

    def prepare(record: ImageRecord) -> int:
        if record.image_id == "i2":
            raise DataError(f"{record.path}: unreadable")
        return int(record.image_id[1:])

    skipped: list[dict[str, str]] = []
    with caplog.at_level("WARNING"):
        got = [(r.image_id, v) for r, v in readable(records, prepare, skipped, "test", progress=False)]
    assert got == [("i0", 0), ("i1", 1), ("i3", 3)]
    assert skipped == [{"path": str(tmp_path / "i2.png"), "error": f"{tmp_path / 'i2.png'}: unreadable"}]
    assert "skipped unreadable image" in caplog.text and "i2.png" in caplog.text

    def interrupted(record: ImageRecord) -> int:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        list(readable(records, interrupted, [], "test", progress=False))
