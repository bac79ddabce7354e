"""`larvseg hub save / push` and loading a saved model: a folder, or hf-hub:<org>/<name> from an offline cache."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from larvseg.cli import main as cli_main
from larvseg.config import Config, EvalConfig, ModelConfig, SourceConfig
from larvseg.models.segmenter import build_segmenter
from larvseg.predict import LarvSegPredictor
from larvseg.train.checkpoint import save_checkpoint
from subprocesses import clean_env

NAMES = ["sky", "tree", "road", "person", "car", "building"]
REPO = "larvseg-test/tiny-c171"
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A training checkpoint (memory bank included) with the run's final evaluation next to it."""
    work = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    cfg = Config(
        model=ModelConfig(arch="vit_mini", drop_path=0.0, memory_bank_size=2, cac=True),
        eval=EvalConfig(mode="slide", crop_size=48, stride=32, short_side=40),
    )
    cfg.data.seg_sources = [SourceConfig(name="C171", format="coco171")]
    cfg.data.tag_sources = [SourceConfig(name="IN124", format="imagenet", classes="ade150")]
    cfg.data.eval = SourceConfig(name="A150", format="ade150")
    segmenter = build_segmenter(cfg.model, len(NAMES))
    path = work / "iter_00000040.pth"
    save_checkpoint(
        path,
        {
            "model": segmenter.state_dict(),
            "config": cfg.to_dict(),
            "vocab": NAMES,
            "step": 40,
            "supervised": [0, 1, 2, 4],
        },
    )
    (work / "eval_iter_40").mkdir()
    results = {
        "mIoU": 41.5,
        "mIoU_base": 55.25,
        "mIoU_novel": 12.0,
        "mAcc": 60.0,
        "mAcc_base": 70.0,
        "mAcc_novel": float("nan"),
        "aAcc": 80.125,
        "aAcc_base": 81.0,
        "aAcc_novel": 60.0,
        "num_images": 7,
    }
    (work / "eval_iter_40" / "eval_results.json").write_text(json.dumps(results))
    image = cv2.resize(
        np.random.default_rng(3).integers(0, 256, (4, 5, 3), dtype=np.uint8), (70, 50), interpolation=cv2.INTER_CUBIC
    )
    cv2.imwrite(str(work / "photo.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return path, image


def test_save_and_load_round_trip(trained, tmp_path, capsys):
    path, image = trained
    out = tmp_path / "tiny-c171"
    assert cli_main(["hub", "save", str(path), str(out), "--repo-id", REPO]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["model.safetensors", "config.json", "classes.json", "supervised.json", "eval_results.json", "README.md"]
    )
    assert "wrote model.safetensors" in capsys.readouterr().out
    assert json.loads((out / "classes.json").read_text()) == NAMES
    assert json.loads((out / "supervised.json").read_text()) == {
        "union_ids": [0, 1, 2, 4],
        "names": ["sky", "tree", "road", "car"],
    }
    config = json.loads((out / "config.json").read_text())
    assert (
        config["library_name"] == "larvseg" and config["step"] == 40 and config["config"]["model"]["arch"] == "vit_mini"
    )
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: larvseg\n")
    assert "6 classes" in card and "4 of them had masks or tags" in card
    assert "| masks | C171 | coco171 | all |" in card and "| tags | IN124 | imagenet | ade150 |" in card
    assert "| mIoU | 41.50 | 55.25 | 12.00 |" in card and "| mAcc | 60.00 | 70.00 | – |" in card
    assert f'from_pretrained("hf-hub:{REPO}"' in card and f"larvseg predict hf-hub:{REPO} photo.jpg" in card

    # identical predictions from the folder and the original checkpoint, with the same default vocabulary
    reference = LarvSegPredictor.from_checkpoint(path, device="cpu", amp="off")
    loaded = LarvSegPredictor.from_pretrained(out, device="cpu", amp="off")
    assert loaded.supervised.tolist() == [0, 1, 2, 4] and loaded.class_names == NAMES
    np.testing.assert_array_equal(loaded(image).label_map, reference(image).label_map)
    for key, value in reference.segmenter.state_dict().items():
        assert torch.equal(loaded.segmenter.state_dict()[key], value), key
    # and every command that reads a checkpoint takes the folder
    assert (
        cli_main(
            [
                "predict",
                str(out),
                str(path.parent / "photo.png"),
                "--out",
                str(tmp_path / "pred"),
                "--device",
                "cpu",
                "--amp",
                "off",
            ]
        )
        == 0
    )
    labels = cv2.imread(str(tmp_path / "pred" / "photo_labels.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(
        labels, reference(cv2.cvtColor(cv2.imread(str(path.parent / "photo.png")), cv2.COLOR_BGR2RGB)).label_map
    )


def test_save_without_eval_results_and_bad_folders(trained, tmp_path, capsys):
    path, _ = trained
    lone = tmp_path / "lone.pth"
    shutil.copy(path, lone)
    assert cli_main(["hub", "save", str(lone), str(tmp_path / "m")]) == 0
    assert not (tmp_path / "m" / "eval_results.json").exists()
    assert "No evaluation results" in (tmp_path / "m" / "README.md").read_text()
    assert "no eval_results.json found" in capsys.readouterr().out
    (tmp_path / "m" / "classes.json").write_text(json.dumps(NAMES[:3]))
    assert cli_main(["predict", str(tmp_path / "m"), str(path.parent / "photo.png"), "--out", str(tmp_path / "p")]) == 1
    assert "the weights hold 6 classes but classes.json lists 3" in capsys.readouterr().err
    assert cli_main(["hub", "push", str(tmp_path), REPO]) == 1
    assert "not a saved model folder" in capsys.readouterr().err


def _hub_cache(root, folder):
    """$HF_HOME as huggingface_hub lays it out: hub/models--<org>--<name>/{refs/main, snapshots/<rev>/...}."""
    repo_dir = root / "hub" / ("models--" + REPO.replace("/", "--"))
    shutil.copytree(folder, repo_dir / "snapshots" / REVISION)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(REVISION)


def test_hf_hub_name_loads_offline_from_the_cache(trained, tmp_path):
    pytest.importorskip("huggingface_hub", reason="the [hub] extra is not installed")
    path, image = trained
    folder = tmp_path / "saved"
    assert cli_main(["hub", "save", str(path), str(folder)]) == 0
    _hub_cache(tmp_path / "hf", folder)
    env = {k: v for k, v in clean_env().items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")  # a fresh process reads them on import
    cmd = [
        sys.executable,
        "-m",
        "larvseg.cli",
        "predict",
        f"hf-hub:{REPO}",
        str(path.parent / "photo.png"),
        "--out",
        str(tmp_path / "out"),
        "--device",
        "cpu",
        "--amp",
        "off",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    labels = cv2.imread(str(tmp_path / "out" / "photo_labels.png"), cv2.IMREAD_UNCHANGED)
    photo = cv2.cvtColor(cv2.imread(str(path.parent / "photo.png")), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(
        labels, LarvSegPredictor.from_checkpoint(path, device="cpu", amp="off")(photo).label_map
    )
    cmd[4] = "hf-hub:larvseg-test/not-cached"
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert (
        "hf-hub:larvseg-test/not-cached: not in the Hugging Face cache" in proc.stderr
        and "HF_HUB_OFFLINE=1" in proc.stderr
    )


def test_push_uploads_the_saved_files(trained, tmp_path, monkeypatch, capsys):
    huggingface_hub = pytest.importorskip("huggingface_hub", reason="the [hub] extra is not installed")
    path, _ = trained
    folder = tmp_path / "saved"
    assert cli_main(["hub", "save", str(path), str(folder)]) == 0
    (folder / "notes.txt").write_text("not part of the model")  # stray files are not uploaded
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):  # what the Hub would receive: the folder's files the library's filter keeps
        names = sorted(p.name for p in folder.iterdir())
        files = sorted(huggingface_hub.utils.filter_repo_objects(names, allow_patterns=kwargs["allow_patterns"]))
        calls.append(("upload_folder", kwargs, files))
        return "https://huggingface.co/larvseg-test/tiny-c171/commit/abc"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    assert cli_main(["hub", "push", str(folder), REPO, "--private"]) == 0
    assert calls[0] == ("create_repo", REPO, {"repo_type": "model", "private": True, "exist_ok": True})
    _, kwargs, files = calls[1]
    assert kwargs["repo_id"] == REPO and kwargs["folder_path"] == str(folder) and kwargs["repo_type"] == "model"
    assert (
        sorted(kwargs["allow_patterns"])
        == files
        == sorted(
            ["model.safetensors", "config.json", "classes.json", "supervised.json", "eval_results.json", "README.md"]
        )
    )
    assert f"uploaded {folder} to https://huggingface.co/{REPO}" in capsys.readouterr().out
