"""Class queries in words over the ImageNet-21K vocabulary: resolving, autocompletion, and what a concept costs.

A concept (``dog*``) is scored as its member classes' union: the same class set through the same inference
path, then one table lookup per pixel. This times, side by side on a random vit_mini over the 21,829-class
vocabulary of a model trained on all of ImageNet-21K:

- the predictor with ``dog*`` (one concept, its ~190 classes) vs the same classes named one by one;
- ``entity*`` (every class as one concept, the bounded-argmax path) vs every class named (``classes=None``
  with all classes as the class set);

and checks that the concept's label map is the plain one mapped through the concept's lookup table. It also
reports the one-off cost of the resolver (0.5 s: WordNet table + the ImageNet naming) and per-query latencies.

    python benchmarks/bench_class_query.py           # 512 x 683 image
"""

from __future__ import annotations

import time

import numpy as np

from common import parser, report, setup, time_side_by_side
from larvseg.config import EvalConfig, ModelConfig
from larvseg.data.class_query import ClassResolver, suggest
from larvseg.data.vocabulary import Vocabulary, imagenet_names
from larvseg.data.wordnet import wordnet
from larvseg.models.segmenter import build_segmenter
from larvseg.predict import LarvSegPredictor


def _ms(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def main() -> None:
    p = parser(__doc__)
    args = p.parse_args()
    device = setup(args)
    h, w = (64, 96) if args.tiny else (512, 683)
    repeats = 1 if args.tiny else args.repeats

    t0 = time.perf_counter()
    wordnet()
    names = Vocabulary(imagenet_names("all")).names
    resolver = ClassResolver(names)
    build_s = time.perf_counter() - t0
    resolve_ms = _ms(lambda: resolver.resolve(["automobile", "dog*"]))
    entity_ms = _ms(lambda: resolver.resolve(["entity*"]))
    suggest_ms = _ms(lambda: suggest("dog", resolver))

    model = build_segmenter(ModelConfig(arch="vit_mini", drop_path=0.0, cac=False), len(names)).to(device).eval()
    eval_cfg = EvalConfig(mode="slide", crop_size=512, stride=341, short_side=0)
    image = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)

    def predictor(classes):
        pred = LarvSegPredictor(model, names, classes=classes, eval_cfg=eval_cfg, amp="off")
        _ = pred.resolver  # built once, outside the timing
        return pred

    dog = predictor("dog*")
    members = [names[i] for i in dog.query.class_ids]
    dog_plain = predictor(members)
    everything = predictor("entity*")
    plain_all = predictor(None)
    assert plain_all.class_ids is None and len(everything.query.class_ids) == len(names)
    t = time_side_by_side(
        {
            "dog_concept": lambda: dog(image),
            "dog_plain": lambda: dog_plain(image),
            "all_concept": lambda: everything(image),
            "all_plain": lambda: plain_all(image),
        },
        device,
        repeats,
    )
    same = bool(
        np.array_equal(dog(image).label_map, dog.query.label_lut[dog_plain(image).label_map])
        and np.array_equal(everything(image).label_map, everything.query.label_lut[plain_all(image).label_map])
    )
    report(
        "class_query",
        classes=len(names),
        dog_members=len(members),
        image=f"{h}x{w}",
        resolver_build_s=build_s,
        resolve_ms=resolve_ms,
        entity_resolve_ms=entity_ms,
        suggest_ms=suggest_ms,
        dog_concept_vs_plain=t["dog_concept"] / t["dog_plain"],
        all_concept_vs_plain=t["all_concept"] / t["all_plain"],
        all_plain_s=t["all_plain"],
        identical=same,
    )
    if not same:
        raise SystemExit("a concept's labels differ from its members' labels mapped to the concept")


if __name__ == "__main__":
    main()
