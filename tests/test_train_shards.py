"""Training from WebDataset shards end to end, with the real data layer:

(a) `larvseg data shard` writes a tiny I22K folder and a tiny COCO-Stuff source; every image of the
    folders is in the shards exactly once with its label map / tag;
(b) `larvseg train` from those shards (the segmentation shards read by offset, the ImageNet shards
    streamed through a `pipe:` command) is killed between checkpoints and resumed, and ends with the
    weights of an uninterrupted run from the same shards;
(c) tools/dist_train.sh on 2 "nodes" x 2 processes (gloo, CPU) rendezvousing through NNODES, NODE_RANK,
    MASTER_ADDR=127.0.0.1 and MASTER_PORT gives the weights of one process (shards read by offset).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from larvseg.cli import main as cli_main
from larvseg.config import load_config
from larvseg.data import shards as wds
from larvseg.data import testing as T
from larvseg.data.vocabulary import imagenet_names, imagenet_subset
from larvseg.train import loop
from larvseg.train.checkpoint import list_checkpoints, load_checkpoint
from subprocesses import clean_env, kill_when_written

REPO = Path(__file__).resolve().parent.parent
WNIDS = imagenet_subset("ade847")[:3]

CONFIG = """
data:
  root: {root}
  seg_sources:
    - {{name: C171, format: webdataset, root: C171_shards, crop_size: 32}}
  tag_sources:
    - {{name: IN, format: webdataset, root: "{tags}", index: "{index}", crop_size: 32, loss_weight: 0.2,
        cac_weight: 0.1, cac_topk: 2}}
  seg_batch_size: {seg}
  tag_batch_size: 3
  num_workers: 0
  scale: [64, 32]
  ratio_range: [0.75, 1.25]
  eval: {{name: C171, format: webdataset, root: C171_shards}}
model: {{arch: vit_mini, drop_path: 0.0, memory_bank_size: 2, num_sampled_classes: 3, pretrained: ""}}
train: {{iters: {iters}, lr: 0.05, log_interval: 2, checkpoint_interval: 2, keep_last: 5, eval_interval: -1,
        amp: "off", device: cpu, seed: 3}}
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_shards")
    rng = np.random.default_rng(1)
    T.write_imagenet(root / "I22K", WNIDS, per_class=4, size=(40, 48), rng=rng)
    (root / "w.txt").write_text("\n".join(WNIDS))
    T.write_coco171(root / "C171", n=6, size=(40, 48), rng=rng, split="train2017")
    assert (
        cli_main(
            [
                "data",
                "shard",
                str(root / "I22K"),
                "--out",
                str(root / "IN_shards"),
                "--format",
                "imagenet",
                "--classes",
                str(root / "w.txt"),
                "--shard-samples",
                "4",
                "--index-cache-dir",
                str(root / "cache"),
            ]
        )
        == 0
    )
    assert (
        cli_main(
            [
                "data",
                "shard",
                str(root / "C171"),
                "--out",
                str(root / "C171_shards"),
                "--format",
                "coco171",
                "--split",
                "train2017",
                "--shard-samples",
                "2",
            ]
        )
        == 0
    )
    return root


def _members(folder: Path) -> list[dict[str, bytes]]:
    groups: dict[str, dict[str, bytes]] = {}
    for path in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(path) as tar:
            for m in tar:
                key, ext = wds.split_member(m.name)
                groups.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return list(groups.values())


def test_every_folder_image_is_in_the_shards_once(shards):
    root = shards
    names = imagenet_names(str(root / "w.txt"))
    tagged = {}
    for sample in _members(root / "IN_shards"):
        meta = json.loads(sample["json"])
        assert meta["path"] not in tagged
        assert sample["jpeg"] == (root / "I22K" / meta["path"]).read_bytes()
        tagged[meta["path"]] = names[int(sample["cls"])]
    files = sorted((root / "I22K").rglob("*.JPEG"))
    assert sorted(tagged) == sorted(str(p.relative_to(root / "I22K")) for p in files)
    assert all(tagged[str(p.relative_to(root / "I22K"))] == names[WNIDS.index(p.parent.name)] for p in files)
    labelled = {}
    for sample in _members(root / "C171_shards"):
        meta = json.loads(sample["json"])
        assert meta["path"] not in labelled
        assert sample["jpg"] == (root / "C171" / meta["path"]).read_bytes()
        assert sample["label.png"] == (root / "C171" / meta["label"]).read_bytes()
        labelled[meta["path"]] = meta["label"]
    assert sorted(labelled) == sorted(f"images/train2017/{i:012d}.jpg" for i in range(6))
    assert all(Path(v).stem == Path(k).stem for k, v in labelled.items())


def _config(root: Path, name: str, streamed: bool, seg: int = 3, iters: int = 6) -> Path:
    tags = f"pipe:cat {root}/IN_shards/shard-{{000000..000002}}.tar" if streamed else "IN_shards"
    path = root / f"{name}.yaml"
    path.write_text(
        CONFIG.format(
            root=root, tags=tags, index=f"{root}/IN_shards/index.json" if streamed else "", seg=seg, iters=iters
        )
    )
    return path


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].double(), b[key].double(), atol=atol, rtol=0), key


def test_train_from_shards_killed_and_resumed_matches_uninterrupted(shards):
    root = shards
    config = _config(root, "streamed", streamed=True)
    cfg = load_config(config, [f"train.work_dir={root / 'ref'}"])
    loop.train(cfg, *loop.build(cfg, torch.device("cpu")), resume="none")
    ref = load_checkpoint(root / "ref" / "iter_00000006.pth")

    work = root / "killed"
    cmd = [sys.executable, "-m", "larvseg.cli", "train", str(config), "--work-dir", str(work)]
    kill_when_written(cmd, work / "iter_00000002.pth", timeout=120)
    assert not (work / "final.safetensors").exists()  # it really was interrupted
    assert [s for s, _ in list_checkpoints(work)][-1] < 6

    done = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout
    got = load_checkpoint(work / "iter_00000006.pth")
    _assert_same(got["model"], ref["model"], 1e-6)
    first = load_checkpoint(root / "ref" / "iter_00000002.pth")["model"]
    assert sum(not torch.equal(first[k], ref["model"][k]) for k in first) > len(first) // 2  # it trained


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_of_two_processes_match_one_process(shards):
    root = shards
    config = _config(root, "offsets", streamed=False, seg=3, iters=2)  # 3 seg images over 4 ranks: one gets 0
    cfg = load_config(config, [f"train.work_dir={root / 'one'}"])
    loop.train(cfg, *loop.build(cfg, torch.device("cpu")), resume="none")
    env = dict(clean_env(), NNODES="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    nodes = [
        subprocess.Popen(
            ["bash", str(REPO / "tools" / "dist_train.sh"), str(config), "2", "--work-dir", str(root / "multi")],
            env=dict(env, NODE_RANK=str(node)),
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in range(2)
    ]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (out, err) in zip(nodes, outputs):
        assert node.returncode == 0, out[-2000:] + err[-3000:]
    assert sum(out.count("done:") for out, _ in outputs) == 1  # global rank 0 (on node 0) reports
    assert outputs[1][0] == ""  # ranks 2 and 3 (node 1) log their status at INFO, which only rank 0 shows
    _assert_same(
        load_checkpoint(root / "multi" / "iter_00000002.pth")["model"],
        load_checkpoint(root / "one" / "iter_00000002.pth")["model"],
        1e-5,
    )
