"""Memory bank and the Category-wise Attentive Classifier against loop-based references over a FULL bank
(classes x M slots x K pixel features), as the original stores it, on batches that mix single-tag and
multi-tag images (the background rule is chosen per (image, tag) pair)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from larvseg.data.batch import TAG_PAD
from larvseg.models.attentive_classifier import BackgroundRule, attention_scores, bank_entries, cac_loss
from larvseg.models.memory_bank import MemoryBank


class FullBank:
    """Reference: per class a Python list used as a FIFO ring of M slots, each slot K feature vectors."""

    def __init__(self, num_classes: int, m: int) -> None:
        self.m = m
        self.rings = [[None] * m for _ in range(num_classes)]
        self.ptr = [0] * num_classes
        self.wraps = [0] * num_classes

    def push(self, c: int, feats_k: torch.Tensor) -> None:  # feats_k (K, D)
        self.rings[c][self.ptr[c]] = feats_k.clone()
        self.ptr[c] += 1
        if self.ptr[c] == self.m:
            self.ptr[c] = 0
            self.wraps[c] += 1

    def all_features(self, c: int) -> torch.Tensor | None:
        filled = [s for s in self.rings[c] if s is not None]
        return torch.cat(filled) if filled else None

    def score(self, c: int, p: torch.Tensor) -> torch.Tensor | None:
        """mean over every stored feature q of p_i . q -> (hw,)"""
        q = self.all_features(c)
        if q is None:
            return None
        return torch.tensor(
            [sum(float(p[:, i] @ q[j]) for j in range(q.shape[0])) / q.shape[0] for i in range(p.shape[1])]
        )


def test_fifo_wraps_and_warm_up_in_order():
    torch.manual_seed(0)
    bank, ref = MemoryBank(5, 3, 4), FullBank(5, 3)
    calls = [[1, 1, 2], [1], [3, 1, 1, 1, 1, 3], [], [4, 2, 2, 2, 2, 2, 2, 2]]  # duplicates, > M in one call
    for cls in calls:
        feats = torch.randn(len(cls), 4)
        bank.enqueue(torch.tensor(cls, dtype=torch.long), feats)
        for c, f in zip(cls, feats):
            ref.push(c, f[None])
        assert bank.ptr.tolist() == ref.ptr and bank.wraps.tolist() == ref.wraps
        for c in range(5):
            for s in range(3):
                expect = ref.rings[c][s][0] if ref.rings[c][s] is not None else torch.zeros(4)
                torch.testing.assert_close(bank.slots[c, s], expect, rtol=0, atol=0)
    ids = torch.arange(5)
    assert bank.warmed_up(ids, 1).tolist() == [w >= 1 for w in ref.wraps]
    assert bank.warmed_up(ids, 2).tolist() == [w >= 2 for w in ref.wraps]
    assert bank.num_filled(ids).tolist() == [sum(s is not None for s in r) for r in ref.rings]
    assert ref.wraps == [0, 2, 2, 0, 0] and ref.ptr == [0, 1, 2, 2, 1]


def test_per_slot_mean_bank_equals_full_bank():
    torch.manual_seed(1)
    V, M, K, D, hw = 4, 3, 5, 8, 12
    bank, ref = MemoryBank(V, M, D), FullBank(V, M)
    for _ in range(5):  # 5 images per class: the ring wraps and overwrites
        feats = F.normalize(torch.randn(V, D, hw), dim=1)
        scores = torch.randn(V, V, hw)
        img = torch.arange(V)
        entries = bank_entries(feats, scores, img, img, K)
        bank.enqueue(img, entries)
        for c in range(V):
            top = sorted(range(hw), key=lambda i: -float(scores[c, c, i]))[:K]
            ref.push(c, feats[c][:, top].T)
    p = F.normalize(torch.randn(D, hw), dim=0)
    ours = bank.class_means(torch.arange(V)) @ p
    for c in range(V):
        assert ref.all_features(c).shape == (M * K, D)
        torch.testing.assert_close(ours[c], ref.score(c, p), atol=1e-5, rtol=0)


def _loop_score(p, s, tags, class_ids, ref: FullBank, rule: BackgroundRule):
    """Reference CAC score per (image, tag slot) from the full bank, with explicit loops, the background
    rule chosen per pair: the image's other tags if it has any, else the top-k score rule + MSE filter."""
    b_, _, hw = p.shape
    out = {}
    for b in range(b_):
        image_tags = [t for t in tags[b].tolist() if t != TAG_PAD]
        for slot, l in enumerate(tags[b].tolist()):
            if l == TAG_PAD:
                continue
            f = ref.score(int(class_ids[l]), p[b])
            f = torch.zeros(hw) if f is None else f
            bgs = []
            if len(image_tags) > 1:
                for c in image_tags:
                    if c != l and ref.score(int(class_ids[c]), p[b]) is not None:
                        bgs.append(ref.score(int(class_ids[c]), p[b]))
            else:
                for c in range(s.shape[1]):
                    top = sorted(s[b, c].tolist(), reverse=True)[: rule.bg_topk]
                    if sum(top) / len(top) <= rule.score_thresh or c == l:
                        continue
                    bc = ref.score(int(class_ids[c]), p[b])
                    if bc is None:
                        continue
                    zf = (f - f.mean()) / f.std()  # unbiased, no eps
                    zb = (bc - bc.mean()) / bc.std()
                    if float(((zf - zb) ** 2).mean()) > rule.mse_thresh:
                        bgs.append(bc)
            score = f - sum(bgs) / len(bgs) if bgs else f - (1 - f)
            out[(b, slot)] = (score, len(bgs))
    return out


def _candidates(s, tags, rule):
    """Number of top-k-rule candidates (c != l) of each single-tag image, before the MSE filter."""
    out = {}
    for b in range(tags.shape[0]):
        image_tags = [t for t in tags[b].tolist() if t != TAG_PAD]
        if len(image_tags) == 1:
            out[b] = sum(
                1
                for c in range(s.shape[1])
                if c != image_tags[0]
                and sum(sorted(s[b, c].tolist(), reverse=True)[: rule.bg_topk]) / rule.bg_topk > rule.score_thresh
            )
    return out


def _filled_banks(V, M, K, D, seed, skip=(), partial=None):
    g = torch.Generator().manual_seed(seed)
    bank, ref = MemoryBank(V, M, D), FullBank(V, M)
    for c in range(V):
        if c in skip:
            continue
        for _ in range((partial or {}).get(c, M)):
            feats = F.normalize(torch.randn(K, D, generator=g), dim=1)
            bank.enqueue(torch.tensor([c]), feats.mean(0, keepdim=True))
            ref.push(c, feats)
    return bank, ref


# tag sets (subset indices): one source may hold single-tag images (a crop of one class) and multi-tag ones
SINGLE = torch.tensor([[1], [5], [4]])
MULTI = torch.tensor([[1, 3, 4], [5, TAG_PAD, TAG_PAD], [6, 4, TAG_PAD]])  # image 1 has ONE tag; 4's bank is empty
MIXED = torch.tensor([[1, 3, 4], [5, TAG_PAD, TAG_PAD], [6, 4, TAG_PAD], [TAG_PAD, 2, TAG_PAD]])


@pytest.mark.parametrize("tags", [SINGLE, MULTI, MIXED], ids=["single", "multi_with_a_lone_tag", "mixed"])
def test_cac_score_against_loop(tags):
    torch.manual_seed(2)
    V, M, K, D, hw, N = 12, 2, 3, 6, 10, 8
    bank, ref = _filled_banks(V, M, K, D, seed=3, skip=(7,))  # class 7's bank is empty
    class_ids = torch.tensor([0, 2, 3, 5, 7, 8, 10, 11])  # subset -> union ids
    b = tags.shape[0]
    p = F.normalize(torch.randn(b, D, hw), dim=1)
    s = torch.rand(b, N, hw) * 1.2 - 0.4
    rule = BackgroundRule()
    ours = attention_scores(p, s, tags, TAG_PAD, class_ids, bank, rule)
    ref_scores = _loop_score(p, s, tags, class_ids, ref, rule)
    n_bg = [v[1] for v in ref_scores.values()]
    assert 0 in n_bg and max(n_bg) >= 1  # both branches: f - b and f - (1 - f)
    cands = _candidates(s, tags, rule)
    lone_bg = sum(ref_scores[(i, int((tags[i] != TAG_PAD).nonzero()))][1] for i in cands)
    assert lone_bg > 0  # the top-k rule keeps candidates for single-tag images, whatever the batch ...
    assert sum(cands.values()) - lone_bg > 0  # ... and the MSE filter drops others
    for (i, slot), (score, _) in ref_scores.items():
        torch.testing.assert_close(ours[i, slot], score, atol=1e-5, rtol=0)


def test_never_filled_background_classes_are_left_out():
    """A class whose ring was never filled has no bank features here (the original's would hold random unit
    vectors): as another tag it is left out of b, as a single-tag candidate it is never kept."""
    d, hw = 4, 6
    bank = MemoryBank(5, 2, d)
    means = F.normalize(torch.randn(3, d, generator=torch.Generator().manual_seed(0)), dim=1)
    bank.enqueue(torch.tensor([0, 1, 2]), torch.stack([means[0], means[1], -means[1]]))  # 2 = the opposite of 1
    p = F.normalize(torch.randn(2, d, hw, generator=torch.Generator().manual_seed(1)), dim=1)
    s = torch.zeros(2, 5, hw)
    s[1, [2, 4]] = 0.9  # classes 2 and 4 (never filled) are background candidates of image 1
    tags = torch.tensor([[0, 4], [1, TAG_PAD]])
    ours = attention_scores(p, s, tags, TAG_PAD, torch.arange(5), bank, BackgroundRule())
    f0, f1 = means[0] @ p[0], means[1] @ p[1]
    torch.testing.assert_close(ours[0, 0], f0 - (1 - f0))  # its only other tag, 4, is left out
    torch.testing.assert_close(ours[0, 1], torch.zeros(hw) - f0)  # 4's own f is 0; 0 is its background
    torch.testing.assert_close(ours[1, 0], f1 - (-f1))  # only 2 is kept (its map is -f1: MSE 4 (n-1)/n > 2)


def _naive_cac_loss(logits, s, p, tags, class_ids, ref: FullBank, rule, loss_hw, warm_up):
    """The CAC loss from the formulas, one (image, tag) pair at a time: logits and the standardized score
    bilinearly upsampled to the loss resolution, the sigmoid applied after the upsampling."""
    b_, n, h, w = logits.shape
    up = F.interpolate(logits, size=loss_hw, mode="bilinear", align_corners=False)  # (b, N, Hl, Wl)
    scores = _loop_score(p.flatten(2), s.flatten(2), tags, class_ids, ref, rule)
    total = logits.new_zeros(())
    for (b, slot), (score, _) in scores.items():
        l = int(tags[b, slot])
        z = (score - score.mean()) / torch.sqrt(score.var(unbiased=False) + 1e-5)  # over the h x w pixels
        a = torch.sigmoid(F.interpolate(z.reshape(1, 1, h, w), size=loss_hw, mode="bilinear", align_corners=False))[
            0, 0
        ]
        pooled = torch.stack([(up[b, c] * a).mean() for c in range(n)])
        others = [t for t in tags[b].tolist() if t not in (TAG_PAD, l)]
        kept = [c for c in range(n) if c not in others]
        ce = torch.logsumexp(pooled[kept], 0) - pooled[l]
        if ref.wraps[int(class_ids[l])] >= warm_up:
            total = total + ce
    return total


@pytest.mark.parametrize("feat_hw,loss_hw", [((4, 4), (8, 8)), ((3, 5), (7, 9))])
def test_cac_loss_and_gradient_against_naive_on_a_mixed_batch(feat_hw, loss_hw):
    torch.manual_seed(4)
    V, M, K, D, N = 9, 2, 2, 5, 8
    # class 3 still warming up (counts zero but is a background), class 6 never filled
    bank, ref = _filled_banks(V, M, K, D, seed=5, partial={3: 1}, skip=(6,))
    class_ids = torch.tensor([0, 1, 2, 3, 4, 5, 6, 8])
    b = 5
    logits = torch.randn(b, N, *feat_hw, requires_grad=True)  # feature resolution
    s = torch.rand(b, N, *feat_hw) * 1.2 - 0.4
    p = F.normalize(torch.randn(b, D, *feat_hw), dim=1)
    tags = torch.tensor(
        [[1, 3, TAG_PAD], [2, TAG_PAD, TAG_PAD], [TAG_PAD, 5, TAG_PAD], [7, 6, 4], [6, TAG_PAD, TAG_PAD]]
    )
    rule = BackgroundRule()
    res = cac_loss(logits, s, p, tags, TAG_PAD, class_ids, bank, loss_hw=loss_hw, topk=K, warm_up=1, rule=rule)
    (grad,) = torch.autograd.grad(res.loss_sum, logits)
    naive = _naive_cac_loss(logits, s, p, tags, class_ids, ref, rule, loss_hw, warm_up=1)
    (naive_grad,) = torch.autograd.grad(naive, logits)
    torch.testing.assert_close(res.loss_sum, naive.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, naive_grad, rtol=1e-4, atol=1e-6)
    assert grad.abs().sum() > 0
    # pairs in image-then-slot order; class 3 is warming up (weight 0)
    assert res.pair_classes.tolist() == [1, 3, 2, 5, 8, 6, 4, 6]
    assert res.warmed.tolist() == [True, False, True, True, True, False, True, False]
    # bank entries: the mean of the K top-scoring pixels' features of each pair
    img, slot = (tags != TAG_PAD).nonzero(as_tuple=True)
    for n, (i, l) in enumerate(zip(img.tolist(), tags[img, slot].tolist())):
        top = s[i, l].flatten().topk(K).indices
        torch.testing.assert_close(res.pair_features[n], p[i].flatten(1)[:, top].mean(1))


def test_cac_single_tag_crop_of_a_multi_tag_source_gets_background_suppression():
    """A crop holding one class gets the top-k rule like an ImageNet image: same loss whether it comes in a
    batch of multi-tag images or alone."""
    torch.manual_seed(6)
    V, M, K, D, N, hw = 8, 2, 2, 6, 8, (4, 4)
    bank, ref = _filled_banks(V, M, K, D, seed=7)
    class_ids = torch.arange(N)
    logits = torch.randn(3, N, *hw)
    s = torch.rand(3, N, *hw) * 1.2 - 0.4
    p = F.normalize(torch.randn(3, D, *hw), dim=1)
    tags = torch.tensor([[2, 5], [4, TAG_PAD], [1, 6]])
    rule = BackgroundRule()
    kw = dict(loss_hw=(8, 8), topk=K, warm_up=1, rule=rule)
    scores = _loop_score(p.flatten(2), s.flatten(2), tags, class_ids, ref, rule)
    assert scores[(1, 0)][1] > 0  # the lone tag's pair has kept background classes
    both = cac_loss(logits, s, p, tags, TAG_PAD, class_ids, bank, **kw)
    alone = cac_loss(logits[1:2], s[1:2], p[1:2], tags[1:2, :1], TAG_PAD, class_ids, bank, **kw)
    rest = cac_loss(logits[[0, 2]], s[[0, 2]], p[[0, 2]], tags[[0, 2]], TAG_PAD, class_ids, bank, **kw)
    torch.testing.assert_close(both.loss_sum, alone.loss_sum + rest.loss_sum)


def _ddp_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    from larvseg.models.class_sampling import global_presence

    bank = MemoryBank(4, 3, 2)
    # rank 0 has two entries, rank 1 has none in the first call, one in the second
    calls = {0: [([1, 2], [[1.0, 0.0], [2.0, 0.0]]), ([1], [[3.0, 0.0]])], 1: [([], []), ([1], [[4.0, 0.0]])]}
    for cls, feats in calls[rank]:
        bank.enqueue(torch.tensor(cls, dtype=torch.long), torch.tensor(feats).reshape(-1, 2))
    presence = global_presence(torch.tensor([rank]), 4)
    torch.save({"slots": bank.slots, "ptr": bank.ptr, "presence": presence}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_bank_identical_on_every_rank_under_ddp(tmp_path):
    import torch.multiprocessing as mp

    init = f"file://{tmp_path}/init"
    mp.spawn(_ddp_worker, args=(2, init, str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1))
    single = MemoryBank(4, 3, 2)  # the single-process order: rank 0's entries, then rank 1's, per call
    single.enqueue(torch.tensor([1, 2]), torch.tensor([[1.0, 0.0], [2.0, 0.0]]))
    single.enqueue(torch.tensor([1, 1]), torch.tensor([[3.0, 0.0], [4.0, 0.0]]))
    for r in (r0, r1):
        torch.testing.assert_close(r["slots"], single.slots, rtol=0, atol=0)
        assert torch.equal(r["ptr"], single.ptr)
        assert r["presence"].tolist() == [True, True, False, False]
