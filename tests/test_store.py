from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from persona_axis.errors import PersonaAxisError
from persona_axis.store import RunStore, load_tensors, read_jsonl


def test_torn_last_line_is_dropped_and_cut_before_the_next_append(tmp_path: Path) -> None:
    with RunStore.open(tmp_path) as store:
        store.append("rows", [{"id": 1}, {"id": 2}])
        with (tmp_path / "rows.jsonl").open("ab") as f:
            f.write(b'{"id": 3, "text": "half a reco')  # a crash mid-write
        assert [r["id"] for r in store.records("rows")] == [1, 2]
        store.append("rows", [{"id": 3}])
        assert [r["id"] for r in store.records("rows")] == [1, 2, 3]


def test_corrupt_middle_line_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "rows.jsonl").write_text('{"id": 1}\nnot json\n{"id": 2}\n')
    with pytest.raises(PersonaAxisError, match="line 2 is corrupt"):
        read_jsonl(tmp_path / "rows.jsonl")


def test_tensors_round_trip_with_metadata(tmp_path: Path) -> None:
    with RunStore.open(tmp_path) as store:
        store.save_tensors("sub/t.safetensors", {"a": torch.arange(6.0).reshape(2, 3)}, {"ids": "[1, 2]"})
    tensors, meta = load_tensors(tmp_path / "sub" / "t.safetensors")
    assert torch.equal(tensors["a"], torch.arange(6.0).reshape(2, 3)) and meta == {"ids": "[1, 2]"}
    assert not list((tmp_path / "sub").glob(".*"))  # no temporary files left


def test_second_writer_is_refused(tmp_path: Path) -> None:
    with RunStore.open(tmp_path):
        with pytest.raises(PersonaAxisError, match="in use by another persona-axis process"):
            with RunStore.open(tmp_path):
                pass
        code = f"from persona_axis.store import RunStore\nwith RunStore.open({str(tmp_path)!r}): pass"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0 and "in use by another persona-axis process" in proc.stderr
    with RunStore.open(tmp_path):  # released on exit
        pass


def test_claim_refuses_different_identity(tmp_path: Path) -> None:
    with RunStore.open(tmp_path) as store:
        store.claim({"model": "a", "seed": 1}, {})
        store.claim({"model": "a", "seed": 1}, {})  # same settings: resume
        with pytest.raises(PersonaAxisError, match=r"different settings \(seed: 1 -> 2\)"):
            store.claim({"model": "a", "seed": 2}, {})
