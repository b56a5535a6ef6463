"""Atomic writes: all or nothing, and the permissions a plain open() / mkdir would give."""
import os
import stat

import pytest

from cqtool.io import atomic_dir, atomic_path, write_json


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_atomic_file_gets_umask_permissions(tmp_path, umask_022):
    write_json(tmp_path / "a.json", {"x": 1})
    assert mode(tmp_path / "a.json") == 0o644  # mkstemp alone would leave 0o600
    os.umask(0o077)
    write_json(tmp_path / "b.json", {"x": 1})
    assert mode(tmp_path / "b.json") == 0o600


def test_codebook_file_gets_umask_permissions(tmp_path, umask_022):
    """safetensors replaces the file it writes to (its own temporary file, owner-only): the codebook still ends 0o644."""
    from test_codebook import make_codebook

    from cqtool.models import ModelInfo
    from conftest import tiny_model

    make_codebook(ModelInfo.from_config(tiny_model().config, "tiny")).save(tmp_path / "cb.safetensors")
    assert mode(tmp_path / "cb.safetensors") == 0o644


def test_atomic_file_failure_keeps_the_old_file(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert p.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]


def test_atomic_dir_permissions_and_replace(tmp_path, umask_022):
    d = tmp_path / "out"
    d.mkdir()
    (d / "old.txt").write_text("old")
    with atomic_dir(d) as tmp:
        (tmp / "new.txt").write_text("new")
    assert os.listdir(d) == ["new.txt"] and mode(d) == 0o755  # mkdtemp alone would leave 0o700
    with pytest.raises(RuntimeError):
        with atomic_dir(d) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert os.listdir(d) == ["new.txt"] and sorted(os.listdir(tmp_path)) == ["out"]
