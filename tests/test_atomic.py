"""Write-then-rename: a failure leaves neither a half bundle nor a staging directory."""

from __future__ import annotations

import pytest

from ccra_export.core.atomic import staged_directory, write_json


def test_failure_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), staged_directory(tmp_path / "bundle", replace=False) as stage:
        (stage / "vision.onnx").write_bytes(b"partial")
        raise RuntimeError("export failed")
    assert list(tmp_path.iterdir()) == []


def test_replace_swaps_only_after_success(tmp_path):
    final = tmp_path / "bundle"
    final.mkdir()
    (final / "old").write_text("old")
    with pytest.raises(KeyboardInterrupt), staged_directory(final, replace=True) as stage:
        (stage / "new").write_text("new")
        raise KeyboardInterrupt
    assert [p.name for p in final.iterdir()] == ["old"]
    with staged_directory(final, replace=True) as stage:
        (stage / "new").write_text("new")
    assert [p.name for p in final.iterdir()] == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_write_json_is_atomic_and_readable(tmp_path):
    write_json(tmp_path / "m.json", {"a": 1})
    assert (tmp_path / "m.json").read_text() == '{\n  "a": 1\n}\n'
    assert oct((tmp_path / "m.json").stat().st_mode & 0o044) != "0o0"
