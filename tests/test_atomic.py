"""Atomic writes, one convention (mole.atomic); the gates weights and their JSON settings committed together."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from mole import atomic

REPO = Path(__file__).resolve().parents[1]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "result.json"
    atomic.write_json(target, {"v": 1})
    with pytest.raises(RuntimeError), atomic.replaced(target) as tmp:
        assert tmp.name == f".result.json.tmp-{__import__('os').getpid()}" and atomic.is_temp(tmp)
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"v": 1}
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.json"]
    with pytest.raises(FileNotFoundError, match="nothing was written"), atomic.replaced(tmp_path / "x"):
        pass  # a writer that wrote nothing does not create an empty file


def test_files_written_together_appear_together_in_order(tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.bin"
    with atomic.replace_together(a, b) as (ta, tb):
        ta.write_text("{}")
        tb.write_bytes(b"x")
        assert not a.exists() and not b.exists()  # nothing under the real names before the block ends
    assert a.read_text() == "{}" and b.read_bytes() == b"x"
    assert a.stat().st_mtime_ns <= b.stat().st_mtime_ns  # the last one given is the commit point


def _tiny_gates(tiny_unet, write_expert):
    from mole.inject import apply_mole

    apply_mole(tiny_unet, {"face": write_expert("face"), "hand": write_expert("hand")}, gate="global")
    return tiny_unet


def test_gates_and_their_settings_are_committed_together(tiny_unet, write_expert, tmp_path, caplog, monkeypatch):
    from mole import gates_io
    from mole.gates_io import read_gate_settings, save_gates

    unet = _tiny_gates(tiny_unet, write_expert)
    out = tmp_path / "gates-out"
    path = save_gates(unet, out / "gates.safetensors")
    assert sorted(p.name for p in out.iterdir()) == ["gates.json", "gates.safetensors"]  # no temporaries
    settings = read_gate_settings(path)
    assert settings.gate == "global" and settings.experts == ("face", "hand")
    # An interrupted rewrite: the new sidecar landed, the weights (the commit point) did not. The weights'
    # own settings win, and the reader says why.
    stale = {**settings.to_json(), "gate": "local"}
    (out / "gates.json").write_text(json.dumps(stale))
    with caplog.at_level(logging.WARNING, logger="mole.gates_io"):
        assert read_gate_settings(path).gate == "global"
    assert "disagrees" in caplog.text
    # A write that fails part-way leaves the committed pair as it was.
    before = path.read_bytes()
    original = gates_io.save_file

    def broken(*args, **kwargs):
        original(*args, **kwargs)
        raise RuntimeError("disk full")

    monkeypatch.setattr(gates_io, "save_file", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        save_gates(unet, path)
    assert path.read_bytes() == before and not [p for p in out.iterdir() if atomic.is_temp(p)]


def test_one_temporary_name_convention_in_the_library() -> None:
    """Every write-then-rename goes through mole.atomic (checkpoint folders keep their own resumable names)."""
    pattern = re.compile(r"""\.(tmp|part)["']|\.tmp-\{os\.getpid""")
    offenders = [
        str(f.relative_to(REPO))
        for f in (REPO / "src" / "mole").rglob("*.py")
        if f.name != "atomic.py" and pattern.search(f.read_text(encoding="utf-8"))
    ]
    assert offenders == []
