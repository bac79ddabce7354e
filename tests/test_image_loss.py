"""The image-level loss options (model.image_loss, larvseg/models/image_loss.py) against a naive
implementation written from their formulas (docs/METHOD.md section 6): values and gradients, with
torch.autograd on both, on small random tensors with ties, k of one pixel and of every pixel, single-
and multi-tag images, base tags and pairs with no poolable pixel. Then a training step with each option."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from larvseg.config import ConfigError, ImageLossConfig, ModelConfig, load_config
from larvseg.data.batch import TAG_PAD, SegBatch, StepBatch, TagBatch
from larvseg.models.attentive_classifier import BackgroundRule, cac_loss
from larvseg.models.image_loss import image_level_loss, is_paper, pooled_pairs_ce, topk_count
from larvseg.models.losses import image_level_ce_sum, loss_size, upsampled_mean_weights
from larvseg.models.memory_bank import MemoryBank
from larvseg.models.objective import TrainingObjective

N, H, W = 6, 3, 4
HW = H * W
BASE = torch.tensor([True, True, False, False, True, False])  # classes 0, 1, 4 have pixel masks
# image 0: one base tag; image 1: one novel tag; image 2: two tags; image 3: one novel tag (padded slot)
TAGS = torch.tensor([[1, TAG_PAD], [3, TAG_PAD], [2, 0], [5, TAG_PAD]])


def naive_loss(
    z: torch.Tensor,
    omega: torch.Tensor,
    tags: torch.Tensor,
    opt: ImageLossConfig,
    base: torch.Tensor,
    pair_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The options' formulas with loops over pairs, classes and pixels (module docstring of image_loss)."""
    b, n = z.shape[:2]
    zf = z.reshape(b, n, -1)
    hw = zf.shape[-1]
    total = z.sum() * 0.0
    p = 0
    for bi in range(b):
        image_tags = [t for t in tags[bi].tolist() if t != TAG_PAD]
        for slot_tag in tags[bi].tolist():
            if slot_tag == TAG_PAD:
                continue
            tag = slot_tag
            single = len(image_tags) == 1
            kept = [
                c
                for c in range(n)
                if c == tag or (c not in image_tags and not (opt.drop_base_negatives and single and bool(base[c])))
            ]
            pixels = list(range(hw))
            if opt.confident_base > 0:
                pixels = []
                for i in range(hw):
                    prob = torch.softmax(zf[bi, :, i].detach(), 0)
                    conf = max([float(prob[c]) for c in range(n) if base[c] and c != tag], default=0.0)
                    if conf < opt.confident_base:
                        pixels.append(i)
            gate = 1.0 if pixels else 0.0
            pixels = pixels or list(range(hw))
            if opt.pooling == "region":
                margin = {}
                for i in pixels:
                    rivals = [zf[bi, c, i].detach() for c in kept if c != tag]
                    margin[i] = float(zf[bi, tag, i].detach() - max(rivals)) if rivals else math.inf
                best = max(margin.values())
                pixels = [i for i in pixels if margin[i] >= min(0.0, best)]

            def x(c: int, i: int) -> torch.Tensor:
                return zf[bi, c, i] * (omega[p, i] * hw)

            pooled = []
            for c in range(n):
                if opt.pooling == "topk":
                    k = max(1, math.ceil(opt.topk_fraction * len(pixels) - 1e-9))
                    chosen = sorted(pixels, key=lambda i: (-float(x(c, i).detach()), i))[:k]  # ties: lower index
                else:
                    chosen = pixels
                pooled.append(sum(x(c, i) for i in chosen) / len(chosen))
            pooled = torch.stack(pooled)
            ce = torch.logsumexp(pooled[kept], 0) - pooled[tag]
            weight = gate * (1.0 if pair_weights is None else float(pair_weights[p]))
            total = total + weight * ce
            p += 1
    return total


def _inputs(seed: int, ties: bool, uniform: bool):
    g = torch.Generator().manual_seed(seed)
    b = TAGS.shape[0]
    if ties:  # few distinct values: ties inside a class's pixels and between classes
        z = torch.randint(-2, 3, (b, N, H, W), generator=g).float() / 2
    else:
        z = 2 * torch.randn(b, N, H, W, generator=g)
    z[0, 4] += 4.0  # image 0 (tag 1, base) mostly predicted as base class 4: confident_base removes pixels
    z[3, 0] = 20.0  # image 3: every pixel confidently base class 0 -> no poolable pixel with confident_base
    pairs = int((TAGS != TAG_PAD).sum())
    omega = torch.full((pairs, HW), 1.0 / HW) if uniform else torch.rand(pairs, HW, generator=g) / HW
    return z.requires_grad_(), omega


OPTIONS = [
    ImageLossConfig(),  # the common form with every option off = the paper's pool
    ImageLossConfig(drop_base_negatives=True),
    ImageLossConfig(pooling="topk", topk_fraction=0.25),
    ImageLossConfig(pooling="topk", topk_fraction=1e-3),  # k = 1 pixel
    ImageLossConfig(pooling="topk", topk_fraction=1.0),  # k = every pixel
    ImageLossConfig(pooling="region"),
    ImageLossConfig(confident_base=0.5),
    ImageLossConfig(pooling="topk", topk_fraction=0.3, drop_base_negatives=True, confident_base=0.4),
    ImageLossConfig(pooling="region", drop_base_negatives=True, confident_base=0.4),
]


@pytest.mark.parametrize(
    "opt", OPTIONS, ids=lambda o: f"{o.pooling}-{o.topk_fraction}-{o.drop_base_negatives}-{o.confident_base}"
)
@pytest.mark.parametrize(
    "ties,uniform,shared",
    [(False, False, False), (True, True, False), (True, False, False), (False, False, True), (True, True, True)],
)
def test_options_match_naive_formula(opt, ties, uniform, shared):
    """``shared``: one weight row for every pair, as L_cls passes it (top-k then runs per image)."""
    z, omega = _inputs(7, ties, uniform)
    weights = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0])  # a warm-up gate as the CAC passes it
    got = pooled_pairs_ce(z, omega[0] if shared else omega, TAGS, TAG_PAD, opt, BASE, pair_weights=weights)
    (g_got,) = torch.autograd.grad(got, z)
    ref = naive_loss(z, omega[:1].expand_as(omega) if shared else omega, TAGS, opt, BASE, weights)
    (g_ref,) = torch.autograd.grad(ref, z)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-5, atol=1e-6)
    assert got.item() > 0


def test_edge_cases_are_exercised():
    """The fixtures above really hit what they are meant to: a pair without poolable pixels, k = 1 and
    k = every pixel, ties at the top-k boundary, a region of several pixels and one of a single pixel."""
    z, _ = _inputs(7, ties=True, uniform=True)
    zf = z.detach().flatten(2)
    prob = zf.softmax(1)
    assert (prob[3, 0] >= 0.4).all() and not (prob[1, [0, 1, 4]].amax(0) >= 0.5).all()
    assert topk_count(1e-3, torch.tensor([HW])).item() == 1 and topk_count(1.0, torch.tensor([HW])).item() == HW
    assert topk_count(0.1, torch.tensor([400])).item() == 40  # not 41 through float rounding
    k = topk_count(0.25, torch.tensor([HW])).item()
    sorted_vals = zf.sort(-1, descending=True).values
    assert (sorted_vals[..., k - 1] == sorted_vals[..., k]).any()  # a tie across the boundary
    # region: tag 3 of image 1 wins somewhere (several pixels) in the continuous draw
    zc, _ = _inputs(7, ties=False, uniform=False)
    margin = zc.detach().flatten(2)[1, 3] - zc.detach().flatten(2)[1, [0, 1, 2, 4, 5]].amax(0)
    assert 1 <= int((margin >= 0).sum()) < HW or margin.max() < 0


def test_mean_pool_of_the_common_form_is_the_papers_loss():
    z, _ = _inputs(3, ties=False, uniform=False)
    crop, ds = (48, 64), 2
    w = upsampled_mean_weights((H, W), loss_size(crop, ds), z.device)
    pairs = int((TAGS != TAG_PAD).sum())
    for opt in (ImageLossConfig(), ImageLossConfig(pooling="topk", topk_fraction=1.0)):
        got = pooled_pairs_ce(z, w if opt.pooling == "topk" else w.expand(pairs, -1), TAGS, TAG_PAD, opt, BASE)
        ref = image_level_ce_sum(z, TAGS, TAG_PAD, ds, crop)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.autograd.grad(got, z)[0], torch.autograd.grad(ref, z)[0], rtol=1e-5, atol=1e-7)
    # the dispatcher: every option off is the paper's function itself; an option changes the value
    assert image_level_loss(z, TAGS, TAG_PAD, ds, crop, ImageLossConfig(), BASE).item() == ref.item()
    assert is_paper(ImageLossConfig()) and is_paper(ModelConfig().image_loss) and is_paper(None)
    changed = image_level_loss(z, TAGS, TAG_PAD, ds, crop, ImageLossConfig(pooling="topk"), BASE)
    assert abs(changed.item() - ref.item()) > 1e-3


def test_drop_base_negatives_leaves_multi_tag_images_alone():
    z, omega = _inputs(5, ties=False, uniform=False)
    multi = TAGS[2:3]
    on = pooled_pairs_ce(z[2:3], omega[3:5], multi, TAG_PAD, ImageLossConfig(drop_base_negatives=True), BASE)
    off = pooled_pairs_ce(z[2:3], omega[3:5], multi, TAG_PAD, ImageLossConfig(), BASE)
    assert on.item() == off.item()
    single = TAGS[1:2]  # a novel tag: its base negatives go, so its CE falls
    on = pooled_pairs_ce(z[1:2], omega[1:2], single, TAG_PAD, ImageLossConfig(drop_base_negatives=True), BASE)
    off = pooled_pairs_ce(z[1:2], omega[1:2], single, TAG_PAD, ImageLossConfig(), BASE)
    assert on.item() < off.item()


def test_options_need_the_base_classes():
    z, omega = _inputs(1, ties=False, uniform=True)
    for opt in (ImageLossConfig(drop_base_negatives=True), ImageLossConfig(confident_base=0.5)):
        with pytest.raises(ValueError, match="base classes"):
            pooled_pairs_ce(z, omega, TAGS, TAG_PAD, opt, None)


def test_cac_uses_the_options_on_its_attention_weights():
    """cac_loss with top-k over every pixel equals the paper's CAC term (same attention weights ω), and
    region pooling changes it."""
    torch.manual_seed(0)
    b, d = TAGS.shape[0], 8
    bank = MemoryBank(N, 1, d)
    feats = torch.nn.functional.normalize(torch.randn(b, d, H, W), dim=1)
    for c in range(N):  # fill and wrap every ring once: every pair is warmed up
        bank.enqueue(torch.tensor([c]), torch.nn.functional.normalize(torch.randn(1, d), dim=1))
    logits = torch.randn(b, N, H, W, requires_grad=True)
    scores = torch.einsum("bdhw,nd->bnhw", feats, torch.nn.functional.normalize(torch.randn(N, d), dim=1))
    kw = dict(loss_hw=(6, 8), topk=2, warm_up=1, rule=BackgroundRule(2, 0.0, 0.5))
    ids = torch.arange(N)
    paper = cac_loss(logits, scores, feats, TAGS, TAG_PAD, ids, bank, **kw)
    full = cac_loss(
        logits,
        scores,
        feats,
        TAGS,
        TAG_PAD,
        ids,
        bank,
        **kw,
        options=ImageLossConfig(pooling="topk", topk_fraction=1.0),
        base=BASE,
    )
    assert paper.warmed.all()
    torch.testing.assert_close(full.loss_sum, paper.loss_sum, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        torch.autograd.grad(full.loss_sum, logits)[0],
        torch.autograd.grad(paper.loss_sum, logits)[0],
        rtol=1e-5,
        atol=1e-7,
    )
    region = cac_loss(
        logits, scores, feats, TAGS, TAG_PAD, ids, bank, **kw, options=ImageLossConfig(pooling="region"), base=BASE
    )
    assert abs(region.loss_sum.item() - paper.loss_sum.item()) > 1e-3


def test_config_switches_and_their_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {arch: vit_mini}\n")
    cfg = load_config(
        path,
        [
            "model.image_loss.pooling=topk",
            "model.image_loss.topk_fraction=0.05",
            "model.image_loss.drop_base_negatives=true",
            "model.image_loss.confident_base=0.9",
        ],
    )
    assert cfg.model.image_loss == ImageLossConfig("topk", 0.05, True, 0.9)
    assert is_paper(load_config(path).model.image_loss)
    for bad, key in (
        ("pooling=max", "pooling"),
        ("topk_fraction=0", "topk_fraction"),
        ("topk_fraction=1.5", "topk_fraction"),
        ("confident_base=1", "confident_base"),
        ("confident_base=-0.1", "confident_base"),
    ):
        with pytest.raises(ConfigError, match=f"model.image_loss.{key}"):
            load_config(path, [f"model.image_loss.{bad}"])
    with pytest.raises(ConfigError, match="did you mean 'topk_fraction'"):
        load_config(path, ["model.image_loss.topk_fractio=0.1"])


STEP_OPTIONS = [
    ImageLossConfig(pooling="topk"),
    ImageLossConfig(pooling="region"),
    ImageLossConfig(drop_base_negatives=True),
    ImageLossConfig(confident_base=0.2),
]


@pytest.mark.parametrize("opt", STEP_OPTIONS, ids=lambda o: f"{o.pooling}-{o.drop_base_negatives}-{o.confident_base}")
def test_training_steps_run_with_each_option(opt):
    """Three SGD steps of the tiny segmenter with class sampling and the CAC live (its ring of 2 slots
    wraps after 2 steps): finite terms, every parameter gets a gradient, the option reaches L_cls."""
    from test_model_classifier_losses import _tiny_segmenter

    def run(options: ImageLossConfig) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        seg = _tiny_segmenter()
        obj = TrainingObjective(seg, ModelConfig(num_sampled_classes=3, memory_bank_size=2, image_loss=options), seed=0)
        sgd = torch.optim.SGD(seg.parameters(), lr=0.05)
        sb = SegBatch("S", torch.randn(2, 3, 32, 32), torch.randint(0, 8, (2, 32, 32)), torch.arange(8), 2)
        # single-tag images (one of a base class, 5) and a multi-tag one
        tb = TagBatch(
            "T", torch.randn(3, 3, 32, 32), torch.tensor([[9, TAG_PAD], [5, TAG_PAD], [10, 11]]), torch.arange(4, 20), 3
        )
        for step in range(3):
            sgd.zero_grad()
            out = obj(StepBatch(step, [sb], [tb]))
            out["loss"].backward()
            assert all(torch.isfinite(v) for v in out.values())
            for name, p in seg.named_parameters():
                assert p.grad is not None and torch.isfinite(p.grad).all(), name
            sgd.step()
        return {k: v.detach() for k, v in out.items()}

    out, paper = run(opt), run(ImageLossConfig())
    assert out["cac/T"].item() > 0
    assert out["cls/T"].item() != paper["cls/T"].item()  # the option is wired (the paper path is bitwise repeatable)


def test_train_loop_runs_with_the_options(tmp_path):
    """`larvseg train`'s loop (tests/test_train_loop.py's tiny config, synthetic data) with the options
    switched on by key=value overrides only."""
    from larvseg.train import loop
    from larvseg.train.checkpoint import list_checkpoints
    from test_train_loop import TINY, synthetic_build

    (tmp_path / "tiny.yaml").write_text(TINY)
    for i, overrides in enumerate(
        [
            ["model.image_loss.pooling=topk", "model.image_loss.drop_base_negatives=true"],
            ["model.image_loss.pooling=region", "model.image_loss.confident_base=0.3"],
        ]
    ):
        cfg = load_config(
            tmp_path / "tiny.yaml",
            [f"train.work_dir={tmp_path / str(i)}", "train.iters=3", "train.checkpoint_interval=3", *overrides],
        )
        assert not is_paper(cfg.model.image_loss)
        loop.train(cfg, *synthetic_build(cfg, "cpu"), resume="none")
        assert [s for s, _ in list_checkpoints(tmp_path / str(i))] == [3]


def test_image_loss_config_is_plain_data():
    assert [f.name for f in dataclasses.fields(ImageLossConfig)] == [
        "pooling",
        "topk_fraction",
        "drop_base_negatives",
        "confident_base",
    ]
