"""Memory bank and the Category-wise Attentive Classifier against loop-based references over a FULL bank
(classes x M slots x K pixel features), as the original stores it."""

from __future__ import annotations

import math

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
        return torch.tensor([sum(float(p[:, i] @ q[j]) for j in range(q.shape[0])) / q.shape[0] for i in range(p.shape[1])])


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


def _loop_score(p, s, tags, class_ids, ref: FullBank, single_tag: bool, rule: BackgroundRule):
    """Reference CAC score per (image, tag slot) from the full bank, with explicit loops."""
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
            if not single_tag:
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


@pytest.mark.parametrize("single_tag", [False, True])
def test_cac_score_against_loop(single_tag):
    torch.manual_seed(2)
    V, M, K, D, hw, N = 12, 2, 3, 6, 10, 8
    bank, ref = _filled_banks(V, M, K, D, seed=3, skip=(7,))  # class 7's bank is empty
    class_ids = torch.tensor([0, 2, 3, 5, 7, 8, 10, 11])  # subset -> union ids
    p = F.normalize(torch.randn(3, D, hw), dim=1)
    s = torch.rand(3, N, hw) * 1.2 - 0.4
    if single_tag:
        tags = torch.tensor([[1], [5], [4]])
    else:
        tags = torch.tensor([[1, 3, 4], [5, TAG_PAD, TAG_PAD], [2, 6, TAG_PAD]])
    rule = BackgroundRule()
    ours = attention_scores(p, s, tags, TAG_PAD, class_ids, bank, single_tag, rule)
    ref_scores = _loop_score(p, s, tags, class_ids, ref, single_tag, rule)
    n_bg = [v[1] for v in ref_scores.values()]
    assert 0 in n_bg and max(n_bg) >= 1  # both branches: f - b and f - (1 - f)
    if single_tag:
        dropped = sum(  # candidates removed by the MSE filter exist, so the filter is exercised
            1 for b in range(3) for c in range(N)
            if sum(sorted(s[b, c].tolist(), reverse=True)[:5]) / 5 > 0.35 and c != tags[b, 0]
        ) - sum(n_bg)
        assert dropped > 0
    for (b, slot), (score, _) in ref_scores.items():
        torch.testing.assert_close(ours[b, slot], score, atol=1e-5, rtol=0)


def test_cac_loss_and_entries_against_loop():
    torch.manual_seed(4)
    V, M, K, D, N = 6, 2, 2, 5, 6
    bank, ref = _filled_banks(V, M, K, D, seed=5, partial={3: 1})  # class 3 still warming up: counts zero
    class_ids = torch.arange(N)
    logits = torch.randn(2, N, 4, 4, requires_grad=True)  # feature resolution; the loss is at 8x8
    up = F.interpolate(logits.detach(), size=(8, 8), mode="bilinear", align_corners=False)
    s = torch.rand(2, N, 4, 4)
    p = F.normalize(torch.randn(2, D, 4, 4), dim=1)
    tags = torch.tensor([[1, 3], [2, TAG_PAD]])
    res = cac_loss(logits, s, p, tags, TAG_PAD, class_ids, bank, loss_hw=(8, 8), single_tag=False, topk=K,
                   warm_up=1, rule=BackgroundRule())
    scores = _loop_score(p.flatten(2), s.flatten(2), tags, class_ids, ref, False, BackgroundRule())
    total = 0.0
    for (b, slot), (score, _) in scores.items():
        l = int(tags[b, slot])
        z = (score - score.mean()) / torch.sqrt(score.var(unbiased=False) + 1e-5)
        a = torch.sigmoid(z).reshape(1, 1, 4, 4)
        a = F.interpolate(a, size=(8, 8), mode="bilinear", align_corners=False)[0, 0]
        pooled = [float((up[b, c] * a).mean()) for c in range(N)]
        others = [t for t in tags[b].tolist() if t not in (TAG_PAD, l)]
        kept = [c for c in range(N) if c not in others]
        ce = -(pooled[l] - math.log(sum(math.exp(pooled[c]) for c in kept)))
        total += ce if ref.wraps[l] >= 1 else 0.0
    assert res.loss_sum.item() == pytest.approx(total, rel=1e-5)
    assert res.warmed.tolist() == [True, False, True] and res.pair_classes.tolist() == [1, 3, 2]
    # bank entries: the mean of the K top-scoring pixels' features of each pair
    for n, (b, l) in enumerate([(0, 1), (0, 3), (1, 2)]):
        top = s[b, l].flatten().topk(K).indices
        torch.testing.assert_close(res.pair_features[n], p[b].flatten(1)[:, top].mean(1))
    res.loss_sum.backward()
    assert logits.grad.abs().sum() > 0


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
