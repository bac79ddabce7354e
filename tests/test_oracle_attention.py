"""The oracle attention (the demo's upper bound U): object masks read next to an ImageNet folder, carried
through the same crops as without them, and the attentive loss with the mask as its attention."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from larvseg.config import ConfigError, load_config
from larvseg.data.io import AnnotationError, LabelValueError
from larvseg.data.mixing import MixedLoader, build_training_sources
from larvseg.data.sources import build_vocabulary
from larvseg.data.synthetic import BenchmarkSpec, write_benchmark
from larvseg.models.oracle_attention import oracle_attention_loss


def test_oracle_loss_known_answer():
    # 2 classes on a 2 x 2 feature map, crop 4 x 4 -> loss resolution 2 x 2 (downsample 2): U is the identity
    logits = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 8.0]]]])  # (1, 2, 2, 2)
    tags = torch.tensor([[0]])
    full = torch.ones(1, 4, 4, dtype=torch.bool)
    # a mask over the whole image: the plain mean of the logits, CE with class 0
    pooled = torch.tensor([2.5, 2.0])
    expected = -F.log_softmax(pooled, 0)[0]
    assert math.isclose(oracle_attention_loss(logits, full, tags, -1, (2, 2)).item(), expected.item(), rel_tol=1e-6)
    # the top-left quadrant only: mean over the 4 loss pixels of a * logits = logits[:, 0, 0] / 4
    corner = torch.zeros(1, 4, 4, dtype=torch.bool)
    corner[0, :2, :2] = True
    expected = -F.log_softmax(torch.tensor([0.25, 0.0]), 0)[0]
    assert math.isclose(oracle_attention_loss(logits, corner, tags, -1, (2, 2)).item(), expected.item(), rel_tol=1e-6)
    logits.requires_grad_(True)
    oracle_attention_loss(logits, corner, tags, -1, (2, 2)).backward()
    assert logits.grad[0, :, 1, 1].abs().sum() == 0  # outside the object: no gradient
    with pytest.raises(ValueError, match="several tags"):
        oracle_attention_loss(logits, corner, torch.tensor([[0, 1]]), -1, (2, 2))


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return write_benchmark(
        tmp_path_factory.mktemp("oracle") / "data", BenchmarkSpec(seed=2, num_seg=4, per_class=2, num_eval=1)
    )


def _cfg(bench, masks: bool, extra=()):
    overrides = [
        f"data.root={bench.root}",
        f"data.tag_sources.0.classes={bench.wnid_file}",
        "data.tag_batch_size=4",
        *(["data.tag_sources.0.object_masks=I22K/object_masks", "model.oracle_attention=true"] if masks else []),
        *extra,
    ]
    return load_config("tiny_cpu", overrides)


def test_masks_load_and_ride_along_the_same_crops(bench):
    with_masks, without = _cfg(bench, True), _cfg(bench, False)
    vocab = build_vocabulary(with_masks)
    dataset = build_training_sources(with_masks, vocab)[1].dataset
    item = dataset.load(0)
    path = bench.object_masks / dataset.table.path(0).parent.name / f"{dataset.table.path(0).stem}.png"
    assert np.array_equal(item["label"], np.array(Image.open(path)))
    a = next(iter(MixedLoader(with_masks, vocab, 0, 1))).tag[0]
    b = next(iter(MixedLoader(without, build_vocabulary(without), 0, 1))).tag[0]
    assert b.object_masks is None and a.object_masks.dtype == torch.bool
    assert a.object_masks.shape == (4, 64, 64) and a.object_masks.any()
    assert torch.equal(a.images, b.images) and torch.equal(a.tags, b.tags)  # the masks never steer the crop


def test_bad_or_missing_masks_are_named(bench, tmp_path):
    vocab = build_vocabulary(_cfg(bench, True))
    dataset = build_training_sources(_cfg(bench, True), vocab)[1].dataset
    first = dataset.table.path(0)
    mask = bench.object_masks / first.parent.name / f"{first.stem}.png"
    original = mask.read_bytes()
    try:
        Image.fromarray(np.full(np.array(Image.open(mask)).shape, 2, np.uint8)).save(mask)
        with pytest.raises(LabelValueError, match=first.stem):
            dataset.load(0)
        mask.unlink()
        with pytest.raises(AnnotationError, match="no object mask"):
            dataset.load(0)
    finally:
        mask.write_bytes(original)


def test_config_checks(bench):
    with pytest.raises(ConfigError, match="oracle_attention"):
        _cfg(bench, False, ["model.oracle_attention=true"])
    with pytest.raises(ConfigError, match="oracle_attention"):
        _cfg(bench, True, ["model.cac=false"])
    with pytest.raises(ConfigError, match="object_masks"):
        _cfg(bench, False, ["data.seg_sources.0.object_masks=x"])
