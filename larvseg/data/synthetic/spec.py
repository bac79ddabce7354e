"""What a mini benchmark holds: :class:`BenchmarkSpec`, stored in benchmark.json (plain data)."""

from __future__ import annotations

from dataclasses import dataclass, field

from larvseg.data.synthetic.appearance import BenchmarkError

FORMAT_VERSION = 2  # bump when the generator's output changes, so cached benchmarks are rebuilt
FAMILY_NAMES = ("habitat", "uniform")  # larvseg.data.synthetic.habitat, larvseg.data.synthetic.uniform


@dataclass
class BenchmarkSpec:
    """What to generate. Stored in ``benchmark.json``; a cached benchmark is reused only if it matches."""

    seed: int = 0
    num_seg: int = 400  # C171 training images
    per_class: int = 40  # I22K images per synset
    num_eval: int = 60  # A847 validation images
    sizes: list[list[int]] = field(default_factory=lambda: [[128, 128], [112, 144], [144, 112]])  # (h, w) choices
    jpeg_quality: int = 92
    family: str = "habitat"  # key of FAMILIES: what the scenes hold
    # habitat family only (larvseg.data.synthetic.habitat explains each; fixed before any run)
    habitat_seed: int = 0  # the habitat table is drawn from this seed
    habitats_per_class: int = 2
    p_habitat: float = 0.7  # an image-level photo (an object) is in its tag's habitat with this probability
    max_clutter: int = 2  # untagged objects per image-level photo: 0..max_clutter
    eval_sizes: list[list[int]] = field(
        default_factory=lambda: [[192, 256], [208, 240], [224, 224]]
    )  # >= 12 x 12 tokens
    eval_objects: list[int] = field(default_factory=lambda: [3, 6])  # objects per evaluation image (inclusive)
    eval_object_area: list[float] = field(default_factory=lambda: [0.02, 0.08])  # area fraction of each
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.family not in FAMILY_NAMES:
            raise BenchmarkError(f"benchmark family must be one of {list(FAMILY_NAMES)}, got {self.family!r}")
