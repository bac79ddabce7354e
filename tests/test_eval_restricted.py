"""eval.evaluate.evaluate, the one evaluation path (larvseg eval, evaluation during training, the demo),
on a tiny ADE-150-format set: metrics against a by-hand computation, class restriction, kept predictions."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch

from larvseg.config import IGNORE_INDEX, EvalConfig, ModelConfig, SourceConfig
from larvseg.data import testing as T
from larvseg.data.eval_dataset import build_eval_dataset
from larvseg.data.sources import build_vocabulary
from larvseg.data.vocabulary import UnknownClassError, load_class_names, normalize_name
from larvseg.eval.evaluate import evaluate, scored_classes
from larvseg.models.inference import segment_image
from larvseg.models.segmenter import build_segmenter


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    T.write_ade150(root / "A150", n=3, size=(32, 48), split="validation", values=[0, 1, 3, 13, 150])
    cfg = T.make_config(
        root,
        seg=[SourceConfig(name="C171", format="coco171")],
        eval_source=SourceConfig(name="A150", format="ade150", split="validation"),
    )
    cfg.eval = EvalConfig(mode="whole", short_side=32, amp="off")
    vocab = build_vocabulary(cfg)
    torch.manual_seed(0)
    segmenter = build_segmenter(ModelConfig(arch="vit_mini", drop_path=0.0, cac=False), len(vocab)).eval()
    with torch.no_grad():
        segmenter.classifier.class_embed.normal_()  # spread the classes out: predictions vary over the image
    return cfg, vocab, segmenter


def by_hand(cfg, vocab, segmenter, names):
    """mmseg mIoU over ``names``: predictions restricted to them, other ground truth ignored."""
    ids = vocab.ids(names)
    dataset = build_eval_dataset(cfg, vocab)
    tp, gt, pr = (np.zeros(len(ids)) for _ in range(3))
    for i in range(len(dataset)):
        item = dataset.load(i)
        label = item["label"].astype(np.int64)
        pred = segment_image(
            segmenter,
            torch.from_numpy(item["image"].copy()).permute(2, 0, 1),
            cfg.eval,
            class_ids=torch.from_numpy(ids),
            out_size=label.shape,
        ).numpy()
        valid = np.isin(label, ids)
        for k, c in enumerate(ids):
            tp[k] += np.sum(valid & (label == c) & (pred == c))
            gt[k] += np.sum(valid & (label == c))
            pr[k] += np.sum(valid & (pred == c))
    union = gt + pr - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan) * 100
    return float(np.nanmean(iou)), iou


def test_restricted_evaluation_matches_a_direct_computation(setup):
    cfg, vocab, segmenter = setup
    names = [load_class_names("ade150")[k] for k in (0, 2, 12)]  # the set also holds class 149: ignored here
    restricted = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, classes=",".join(names)))
    results = evaluate(restricted, segmenter, vocab, keep_predictions=2, verbose=False)
    miou, iou = by_hand(cfg, vocab, segmenter, names)
    assert [r["union_id"] for r in results["per_class"]] == vocab.ids(names).tolist()
    assert results["mIoU"] == pytest.approx(miou) and 0 < miou < 100
    np.testing.assert_allclose([r["IoU"] for r in results["per_class"]], iou)
    assert results["num_images"] == 3 and len(results["predictions"]) == 2
    kept = results["predictions"][0]
    assert kept["image"].dtype == np.uint8 and kept["image"].shape[2] == 3
    assert kept["prediction"].shape == kept["label"].shape == (32, 48)
    assert set(np.unique(kept["prediction"])) <= set(vocab.ids(names).tolist())
    assert set(np.unique(kept["label"])) <= set(vocab.ids(names).tolist()) | {IGNORE_INDEX}
    # without the restriction every ADE-150 class is scored, and class 149's pixels count
    full = evaluate(cfg, segmenter, vocab, verbose=False)
    assert len(full["per_class"]) == 150 and "predictions" not in full
    assert sum(r["gt_pixels"] for r in full["per_class"]) > sum(r["gt_pixels"] for r in results["per_class"])
    # COCO's "motorcycle" is not an ADE-150 name, but a WordNet lemma of the synset ADE's "minibike" is matched to
    ade = [normalize_name(n) for n in load_class_names("ade150")]
    assert "motorcycle" not in ade
    assert scored_classes(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, classes="motorcycle")), vocab)[
        0
    ].tolist() == [vocab.index("minibike")]
    # a concept selects every evaluation class at or below it, each scored on its own
    furniture, _ = scored_classes(
        dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, classes="furniture*")), vocab
    )
    assert {"chair", "table", "bed", "sofa"} <= {vocab.names[i] for i in furniture} and "wall" not in {
        vocab.names[i] for i in furniture
    }
    wrong = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, classes="wall,unicorn"))
    with pytest.raises(UnknownClassError, match=re.escape("not in the evaluation set's classes of 150: ['unicorn']")):
        evaluate(wrong, segmenter, vocab, verbose=False)
