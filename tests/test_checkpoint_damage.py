"""Any file that is not a readable checkpoint - text, random bytes, an empty or truncated file, a pickle
of other objects - is one line naming it in every command that reads checkpoints, and auto-resume
falls back past it exactly as past a truncated one."""

from __future__ import annotations

import collections
import os
import pickle

import pytest
import torch

from larvseg.cli import main
from larvseg.errors import CheckpointError
from larvseg.models.io import load_checkpoint
from larvseg.train import checkpoint as ck


class Foreign:
    """An object of another program: torch.load(weights_only=True) refuses to build it."""


def _good_state(step: int) -> dict:
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return {
        "format": 1,
        "step": step,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "config": {},
        "vocab": ["a", "b"],
        "rng": ck.rng_state(),
    }


def _damage(path, kind: str) -> None:
    if kind == "text":
        path.write_text("this is not a checkpoint\n" * 4)
    elif kind == "random":
        path.write_bytes(os.urandom(4096))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "plain_pickle":
        path.write_bytes(pickle.dumps(collections.OrderedDict(weights=[1, 2, 3]), protocol=4))
    elif kind == "foreign_object":
        torch.save({"model": Foreign()}, path)
    elif kind == "truncated":
        ck.save_checkpoint(path, _good_state(9))
        path.write_bytes(path.read_bytes()[:300])
    else:
        raise ValueError(kind)


KINDS = ["text", "random", "empty", "plain_pickle", "foreign_object", "truncated"]


@pytest.mark.parametrize("kind", KINDS)
def test_load_names_the_file(tmp_path, kind):
    path = tmp_path / "model.pth"
    _damage(path, kind)
    with pytest.raises(CheckpointError, match="model.pth: "):
        load_checkpoint(path)


@pytest.mark.parametrize("kind", KINDS)
def test_auto_resume_falls_back_past_it(tmp_path, kind):
    ck.save_checkpoint(tmp_path / ck.checkpoint_name(2), _good_state(2))
    _damage(tmp_path / ck.checkpoint_name(4), kind)
    said = []
    path, state = ck.load_resume("auto", tmp_path, say=said.append)
    assert path == tmp_path / ck.checkpoint_name(2) and state["step"] == 2
    assert len(said) == 1 and ck.checkpoint_name(4) in said[0]


@pytest.mark.parametrize("kind", ["text", "random", "foreign_object"])
def test_every_command_that_reads_a_checkpoint_says_one_line(tmp_path, kind, capsys, monkeypatch):
    monkeypatch.delenv("LARVSEG_DEBUG", raising=False)
    path = tmp_path / "model.pth"
    _damage(path, kind)
    image = tmp_path / "a.png"
    import numpy as np
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    commands = [
        ["predict", str(path), str(image), "--out", str(tmp_path / "out"), "--device", "cpu"],
        ["eval", "tiny_cpu", str(path), "--out", str(tmp_path / "eval")],
        ["export", str(path), "--onnx", str(tmp_path / "m.onnx")],
        ["serve", str(path), "--device", "cpu"],
    ]
    for argv in commands:
        if argv[0] == "export" and pytest.importorskip("onnxruntime") is None:
            continue
        if argv[0] == "serve":
            pytest.importorskip("fastapi")
            pytest.importorskip("uvicorn")
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in err, (argv, err)
        assert str(path) in lines[0] and f"larvseg {argv[0]}: error:" in lines[0], lines[0]
    assert not (tmp_path / "m.onnx").exists()
