"""Experiment configuration: plain dataclasses, loaded from YAML, overridden by ``key=value``.

A config file is a YAML mapping with the sections of :class:`Config`. It may name another file in
``_base_`` (a path relative to itself, or the name of a packaged config); the file's own keys are
merged over the base. Every key is checked against the dataclasses: an unknown or misspelled key is
an error that names it and suggests the closest valid one. Every value is checked against its domain
(the ``DOMAINS`` table written next to each dataclass's fields; larvseg.domains): a value outside it is
one line naming the key, the value and what is allowed. A new field needs an entry there
(tests/test_domains.py names the fields that lack one).

Overrides on the command line use dotted paths, e.g. ``train.iters=1000``, ``model.cac=false``,
``data.tag_sources.1.share=0.25``; values are parsed as YAML scalars. Numbers are read as Python reads
them: ``1e-3`` and ``1.0e10`` are floats (plain YAML 1.1 would read them as strings).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from larvseg.domains import (  # AMP_MODES is part of config's interface too
    AMP,
    AMP_MODES,
    BOOL,
    CLASSES,
    DATASET_FORMATS,
    DEVICE,
    FRACTION,
    INTEGER,
    MULTIPLE_OF_16,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    NUMBER,
    POSITIVE,
    POSITIVE_INT,
    PROBABILITY_BELOW_1,
    TEXT,
    Domain,
    DomainError,
    one_of,
    pair,
)

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_DATA_ROOT = "/workspace/dataset"  # the original project's default
IGNORE_INDEX = 65535  # label value ignored by losses and metrics; also A847's "unlabeled" on disk
# RGB pixel statistics the backbone's inputs are standardised with (ImageNet's, as the AugReg weights
# expect). larvseg.models.segmenter.Segmenter holds them as buffers and applies them in `preprocess`;
# the data layer only needs the mean, to pad crops with a colour that standardises to 0.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
# the keys of larvseg.models.vit.VIT_BUILDERS (tests check that they agree): listed here so that a config
# is checked when it is loaded, not when a model is built (dataset formats: larvseg.domains.DATASET_FORMATS)
VIT_ARCHES = ("vit_mini", "vit_tiny", "vit_small", "vit_base")
EVAL_MODES = ("slide", "whole")
SOURCE_FORMAT = Domain(
    f"one of {', '.join(DATASET_FORMATS)} ('' = no evaluation set: data.eval only)",
    str,
    lambda v: v in ("", *DATASET_FORMATS),
    ("nonsense",),
)
_SCALE_PAIR = pair(POSITIVE_INT)
# a source's own rescale target, or [] for data.scale
SOURCE_SCALE = Domain(
    f"[] (= data.scale) or {_SCALE_PAIR.allowed} [long, short]",
    list,
    lambda v: v == [] or _SCALE_PAIR.test(v),
    _SCALE_PAIR.wrong,
)
SOURCES: Domain = Domain(
    "a list of sources (mappings with name, format, root, ...)", list, lambda v: isinstance(v, list)
)


class ConfigError(DomainError):
    """A config file or override that does not fit the schema."""

    hint = "fix the config file or the key=value override"


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader that reads every float literal Python's float() accepts (1e-3, 1.0e10, 1_000.5,
    .5, inf, nan): YAML 1.1's resolver wants a dot and a signed exponent, so 1e-3 would be a string.
    Booleans are true/false only (not on/off/yes/no)."""


_FLOAT = re.compile(
    r"""^[-+]?(?:(?:[0-9][0-9_]*)?\.[0-9_]*(?:[eE][-+]?[0-9_]+)?|[0-9][0-9_]*[eE][-+]?[0-9_]+
                     |\.(?:inf|Inf|INF)|(?:inf|Inf|INF|infinity|Infinity)|\.(?:nan|NaN|NAN)|(?:nan|NaN|NAN))$""",
    re.X,
)
_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789.in"))
# booleans are true/false only (YAML 1.2): YAML 1.1 also reads on/off/yes/no as booleans, so that
# `train.amp=off` would reach a string key as "False"
for _resolvers in _Loader.yaml_implicit_resolvers.values():
    _resolvers[:] = [(tag, regexp) for tag, regexp in _resolvers if tag != "tag:yaml.org,2002:bool"]
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _float_constructor(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float:
    text = loader.construct_scalar(node)
    try:
        return float(text)
    except ValueError:  # YAML's own spellings: .inf, .nan, 1:30 (sexagesimal)
        return yaml.SafeLoader.construct_yaml_float(loader, node)


_Loader.add_constructor("tag:yaml.org,2002:float", _float_constructor)


def parse_yaml(text: str) -> Any:
    """YAML with Python's float syntax (see _Loader)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


@dataclass
class SourceConfig:
    """One dataset used for training or evaluation.

    Whether a source gives pixel masks or image-level tags depends on the list it is in
    (``data.seg_sources`` or ``data.tag_sources``), not on its format: a segmentation set listed as a
    tag source contributes the classes present in each augmented crop as tags ("A150w").
    """

    name: str = ""  # short name for logs and metrics, e.g. "C171", "A847w", "IN585"
    format: str = ""  # key of larvseg.data.formats.FORMATS: ade150 | ade847 | coco171 | imagenet | custom_seg | custom_tags | webdataset
    root: str = (
        ""  # dataset folder; relative paths are under data.root; "" = the format's default (A150, A847, C171, I22K)
    )
    split: str = (
        ""  # sub-folder of images/ and annotations/; "" = detect the training (data.eval: validation) split's folder
    )
    classes: str = ""  # imagenet: "ade150" (124 synsets), "ade847" (585), "all" (21,843) or a file of wnids; custom formats: class-name file
    share: float = 1.0  # tag sources: relative share of the image-level batch
    crop_size: int = 512  # training crop (512 for segmentation sets, 320 for ImageNet)
    # random rescale target (long, short) of this source's training images, as data.scale; [] = data.scale.
    # The original rescales ImageNet to (320, 320): a whole photo fits its 320 crop at ratio 1.
    scale: list[int] = field(default_factory=list)
    loss_weight: float = 1.0  # seg sources: pixel CE weight; tag sources: lambda_cls of the image-level loss
    cac_weight: float = 0.1  # tag sources: lambda_cac of the attentive-classifier loss
    cac_topk: int = 20  # tag sources: K, pixels per memory-bank slot (40 for ADE-150 tags, 20 for ADE-847/ImageNet)
    skip_bad: bool = False  # skip (and count) unreadable samples instead of stopping with an error
    # imagenet tag sources: a folder of <wnid>/<stem>.png masks of each image's tagged object (1 = object,
    # 0 = not; relative paths are under data.root), read only for model.oracle_attention (the demo's upper
    # bound U: the generator's own masks). "" = none
    object_masks: str = ""
    # webdataset (tar shards): ``root`` is a shard folder, or a brace pattern of shard files / URLs / pipe: commands
    index: str = ""  # webdataset: the shards' index.json (path, URL or pipe:); "" = next to the shards
    stream: bool = False  # webdataset: read shards sequentially even when local (URLs and pipe: always stream)

    DOMAINS: ClassVar[dict[str, Domain]] = {
        "name": TEXT,
        "format": SOURCE_FORMAT,
        "root": TEXT,
        "split": TEXT,
        "classes": TEXT,
        "share": POSITIVE,
        "crop_size": MULTIPLE_OF_16,
        "loss_weight": NON_NEGATIVE,
        "cac_weight": NON_NEGATIVE,
        "cac_topk": POSITIVE_INT,
        "skip_bad": BOOL,
        "index": TEXT,
        "stream": BOOL,
        "scale": SOURCE_SCALE,
        "object_masks": TEXT,
    }


@dataclass
class DataConfig:
    root: str = ""  # "" = $LARVSEG_DATA or /workspace/dataset
    seg_sources: list[SourceConfig] = field(default_factory=list)
    tag_sources: list[SourceConfig] = field(default_factory=list)
    seg_batch_size: int = 8  # segmentation images per step, summed over all ranks
    tag_batch_size: int = 8  # image-level images per step, summed over all ranks
    num_workers: int = 2  # DataLoader workers per source and rank
    scale: list[int] = field(default_factory=lambda: [2048, 512])  # random rescale target (long, short)
    ratio_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    cat_max_ratio: float = 0.75
    # MMSegmentation's PhotoMetricDistortion (brightness, contrast, saturation, hue); off where colour
    # defines the classes (the demo's benchmark: docs/BASE_COLLAPSE.md)
    photometric: bool = True
    index_cache_dir: str = ""  # where file indexes of large folders are cached; "" = ~/.cache/larvseg
    demo_benchmark: bool = (
        False  # smoke runs: if data.root does not exist, write a small `larvseg demo` benchmark there
    )
    eval: SourceConfig = field(
        default_factory=lambda: SourceConfig(name="A150", format="ade150")
    )  # split detected: validation

    DOMAINS: ClassVar[dict[str, Domain]] = {
        "root": TEXT,
        "seg_sources": SOURCES,
        "tag_sources": SOURCES,
        "seg_batch_size": NON_NEGATIVE_INT,
        "tag_batch_size": NON_NEGATIVE_INT,
        "num_workers": NON_NEGATIVE_INT,
        "scale": pair(POSITIVE_INT),
        "ratio_range": pair(POSITIVE, ordered=True),
        "cat_max_ratio": FRACTION,
        "photometric": BOOL,
        "index_cache_dir": TEXT,
        "demo_benchmark": BOOL,
    }  # eval: a SourceConfig, checked by its own table

    def resolved_root(self) -> Path:
        return Path(self.root or os.environ.get("LARVSEG_DATA") or DEFAULT_DATA_ROOT).expanduser()


@dataclass
class ImageLossConfig:
    """Options of the image-level losses (L_cls and the CAC's pooled CE) beyond the paper, all off by
    default; each is one switch. What each does, its source and the mechanism it addresses:
    docs/METHOD.md, section 6, and larvseg/models/image_loss.py."""

    pooling: str = "mean"  # mean (the paper) | topk (each class over its top topk_fraction of pixels) | region (the tag's predicted region)
    topk_fraction: float = 0.1  # pooling=topk: k = ceil(topk_fraction * pixels), at least 1
    drop_base_negatives: bool = False  # single-tag images: classes with masks in a seg source are not softmax negatives
    confident_base: float = (
        0.0  # > 0: leave out of the pool pixels where a base class other than the tag has probability >= this
    )

    DOMAINS: ClassVar[dict[str, Domain]] = {
        "pooling": one_of("mean", "topk", "region"),
        "topk_fraction": FRACTION,
        "drop_base_negatives": BOOL,
        "confident_base": PROBABILITY_BELOW_1,
    }


@dataclass
class ModelConfig:
    arch: str = "vit_base"  # key of larvseg.models.vit.VIT_BUILDERS: vit_tiny | vit_small | vit_base
    pretrained: str = ""  # AugReg .npz, timm .safetensors/.pth, hf-hub:<repo> or a LarvSeg checkpoint; "" = random
    drop_path: float = 0.1
    num_sampled_classes: int = 100  # random classes added to the present ones per step; 0 = the whole vocabulary
    # where a segmentation source's random classes come from: "source" = its own vocabulary (the spec, the
    # original); "training" = every training source's classes, so image-level-only (novel) classes are also
    # negatives on annotated pixels (docs/BASE_COLLAPSE.md)
    seg_class_pool: str = "source"
    loss_downsample: int = 2  # losses are computed at 1/loss_downsample of the crop resolution
    cac: bool = True  # the Category-wise Attentive Classifier loss on image-level data
    memory_bank_size: int = 20  # M, slots per class
    warm_up: int = 1  # full wraps of a class's ring before its CAC loss is used
    # with cac: the attention of each image-level pair is its tagged object's true mask (the tag source's
    # object_masks) instead of the bank's: the demo's upper bound U (larvseg.models.oracle_attention)
    oracle_attention: bool = False
    bg_topk: int = 5  # single-tag background rule: mean of the top-k raw scores ...
    bg_score_thresh: float = 0.35  # ... above this makes a class a background candidate
    bg_mse_thresh: float = 2.0  # keep a candidate if its standardised map differs from f by more than this
    image_loss: ImageLossConfig = field(default_factory=ImageLossConfig)  # beyond the paper, off by default

    DOMAINS: ClassVar[dict[str, Domain]] = {
        "arch": one_of(*VIT_ARCHES),
        "pretrained": TEXT,
        "drop_path": PROBABILITY_BELOW_1,
        "num_sampled_classes": NON_NEGATIVE_INT,
        "seg_class_pool": one_of("source", "training"),
        "loss_downsample": POSITIVE_INT,
        "cac": BOOL,
        "memory_bank_size": POSITIVE_INT,
        "warm_up": NON_NEGATIVE_INT,
        "bg_topk": POSITIVE_INT,
        "bg_score_thresh": NUMBER,
        "bg_mse_thresh": NON_NEGATIVE,
        "oracle_attention": BOOL,
    }


@dataclass
class TrainConfig:
    work_dir: str = ""  # "" = work_dirs/<config name>
    seed: int = 0
    iters: int = 320_000
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    poly_power: float = 0.9
    min_lr: float = 1e-5
    amp: str = "auto"  # auto (bf16 where measured faster on this machine, cached) | bf16 | off
    threads: int = 0  # intra-op threads; 0 = $LARVSEG_THREADS, $OMP_NUM_THREADS or a default from the model size
    device: str = "auto"  # auto | cpu | cuda
    log_interval: int = 50
    checkpoint_interval: int = 4000
    keep_last: int = 3  # checkpoints kept in the work dir
    eval_interval: int = 16_000  # every N steps and at the end; 0 = only at the end; < 0 = never
    resume: str = ""  # checkpoint to resume from; "" = the newest one in work_dir, if any ("auto")
    tensorboard: bool = True  # TensorBoard event files in the work dir (when tensorboardX is installed)

    DOMAINS: ClassVar[dict[str, Domain]] = {
        "work_dir": TEXT,
        "seed": NON_NEGATIVE_INT,
        "iters": POSITIVE_INT,
        "lr": POSITIVE,
        "momentum": PROBABILITY_BELOW_1,
        "weight_decay": NON_NEGATIVE,
        "poly_power": NON_NEGATIVE,
        "min_lr": NON_NEGATIVE,
        "amp": AMP,
        "threads": NON_NEGATIVE_INT,
        "device": DEVICE,
        "log_interval": POSITIVE_INT,
        "checkpoint_interval": POSITIVE_INT,
        "keep_last": NON_NEGATIVE_INT,
        "eval_interval": INTEGER,
        "resume": TEXT,
        "tensorboard": BOOL,
    }


@dataclass
class PretrainConfig:
    """``larvseg pretrain``: AugReg-style classification pretraining of the backbone on the image-level
    sources (``data.tag_sources``). Seed, device, amp, logging, checkpoint interval, keep_last and the
    poly power / floor come from ``train``."""

    work_dir: str = ""  # "" = work_dirs/<config name>_pretrain
    iters: int = 800
    batch_size: int = 32  # images per step over all image-level sources (split by their share)
    loss: str = (
        "softmax"  # softmax (multi-tag images: the target spread over their tags) | sigmoid (one binary CE per class)
    )
    lr: float = 1e-3  # AdamW, as AugReg's Adam with decoupled weight decay
    weight_decay: float = 0.05
    warmup_iters: int = 0  # linear warm-up to lr, then poly decay
    out: str = ""  # the backbone .npz; "" = <work_dir>/backbone.npz

    DOMAINS: ClassVar[dict[str, Domain]] = {
        "work_dir": TEXT,
        "iters": POSITIVE_INT,
        "batch_size": POSITIVE_INT,
        "loss": one_of("softmax", "sigmoid"),
        "lr": POSITIVE,
        "weight_decay": NON_NEGATIVE,
        "warmup_iters": NON_NEGATIVE_INT,
        "out": TEXT,
    }


@dataclass
class EvalConfig:
    mode: str = "slide"  # slide | whole
    crop_size: int = 512
    stride: int = 512
    short_side: int = 512
    max_long_side: int = 2048
    amp: str = "auto"  # auto (bf16 where measured faster on this machine, cached) | bf16 | off
    threads: int = 0  # intra-op threads of eval / predict; 0 = as train.threads
    max_images: int = 0  # 0 = the whole set
    classes: str = ""  # predict and score only these eval classes: comma-separated names or a file; "" = all

    DOMAINS: ClassVar[dict[str, Domain]] = {
        "mode": one_of(*EVAL_MODES),
        "crop_size": POSITIVE_INT,
        "stride": POSITIVE_INT,
        "short_side": NON_NEGATIVE_INT,
        "max_long_side": POSITIVE_INT,
        "amp": AMP,
        "threads": NON_NEGATIVE_INT,
        "max_images": NON_NEGATIVE_INT,
        "classes": CLASSES,
    }


@dataclass
class Config:
    name: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    DOMAINS: ClassVar[dict[str, Domain]] = {"name": TEXT}  # the sections are checked by their own tables

    def work_dir(self) -> Path:
        return Path(self.train.work_dir or f"work_dirs/{self.name or 'default'}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Loading


def resolve_config_path(name_or_path: str | os.PathLike) -> Path:
    """A config file path, or the name of a packaged config (``c171_a150w``, with or without .yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / path.name, CONFIG_DIR / f"{path.name}.yaml"):
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(
        f"config {str(name_or_path)!r} not found: not a file, and not one of the packaged configs {known}"
    )


def _read_yaml_tree(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: _base_ chain loops back to itself")
    try:
        tree = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a config must be a YAML mapping, got {type(tree).__name__}")
    base = tree.pop("_base_", None)
    if base is None:
        return tree
    base_path = path.parent / base
    if not base_path.is_file():
        base_path = resolve_config_path(base)
    return _merge(_read_yaml_tree(base_path, seen + (path,)), tree)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _build(cls: type, tree: Any, where: str, here: bool = True) -> Any:
    """Instantiate dataclass ``cls`` from a plain tree, checking every key, its type and its domain
    (``cls.DOMAINS``; ``here=False`` skips the domains that depend on this machine, for configs stored
    in checkpoints)."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {tree!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in tree.items():
        if key not in fields:
            hint = difflib.get_close_matches(str(key), fields, n=1)
            suggestion = f"; did you mean {hint[0]!r}?" if hint else f"; valid keys: {sorted(fields)}"
            raise ConfigError(f"unknown config key {where + '.' if where else ''}{key}{suggestion}")
        kwargs[key] = _convert(fields[key], value, f"{where + '.' if where else ''}{key}", here)
    instance = cls(**kwargs)
    for name, domain in getattr(cls, "DOMAINS", {}).items():
        if domain.machine and not here:
            continue
        why = domain.problem(getattr(instance, name))
        if why is not None:
            raise ConfigError(f"{where + '.' if where else ''}{name}={getattr(instance, name)!r}: {why}")
    return instance


def _convert(f: dataclasses.Field, value: Any, where: str, here: bool = True) -> Any:
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if dataclasses.is_dataclass(default):
        return _build(type(default), value, where, here)
    if isinstance(default, list):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if f.name.endswith("sources"):
            return [_build(SourceConfig, item, f"{where}.{i}", here) for i, item in enumerate(value)]
        return list(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        if isinstance(value, str):  # a quoted number ("1e-3"): what Python's float() reads is a number
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(default, int) and not float(value).is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return type(default)(value)
    if isinstance(default, str):
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a plain tree (list items are addressed by index)."""
    tree = _merge({}, tree)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        value = parse_yaml(raw) if raw != "" else ""
        node: Any = tree
        parts = key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                node = node[_list_index(node, part, parts[: i + 1])]
            else:
                node = node.setdefault(part, {})
        last = parts[-1]
        if isinstance(node, list):
            node[_list_index(node, last, parts)] = value
        else:
            node[last] = value
    return tree


def _list_index(node: list, part: str, parts: list[str]) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {'.'.join(parts)}: {part!r} is not an index of a list of {len(node)} items")
    return int(part)


def load_config(name_or_path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """Load a config file (or packaged config name), apply ``key=value`` overrides, validate."""
    path = resolve_config_path(name_or_path)
    tree = _read_yaml_tree(path)
    tree.setdefault("name", path.stem)
    tree = apply_overrides(tree, list(overrides or []))
    # Defaults of the "sections" are filled in by the dataclasses; missing sections are fine.
    cfg = _build(Config, tree, "")
    validate(cfg)
    return cfg


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (e.g. stored in a checkpoint; the domains that
    depend on the machine, such as train.device=cuda of a run trained on a GPU, are not checked)."""
    cfg = _build(Config, tree, "", here=False)
    validate(cfg)
    return cfg


def check_amp(amp: str, what: str = "amp", error: type[Exception] = ValueError) -> str:
    """``amp`` if it is one of AMP_MODES, else ``error`` naming ``what`` (the key or argument)."""
    if amp not in AMP_MODES:
        raise error(f"{what} must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    return amp


def validate(cfg: Config) -> None:
    """Checks that involve several keys; single keys are checked against their domains while building."""
    d = cfg.data
    for where, sources in (("seg_sources", d.seg_sources), ("tag_sources", d.tag_sources)):
        for i, s in enumerate(sources):
            if not s.format:
                raise ConfigError(f"data.{where}.{i}.format is required: one of {', '.join(DATASET_FORMATS)}")
            if s.object_masks and (where != "tag_sources" or s.format != "imagenet"):
                raise ConfigError(f"data.{where}.{i}.object_masks: only imagenet-format tag sources have object masks")
    if cfg.model.oracle_attention and not (
        cfg.model.cac and d.tag_sources and all(s.object_masks for s in d.tag_sources)
    ):
        raise ConfigError(
            "model.oracle_attention needs model.cac=true and object_masks on every data.tag_sources entry"
        )
    for key, sources, size in (("seg", d.seg_sources, d.seg_batch_size), ("tag", d.tag_sources, d.tag_batch_size)):
        if sources and size == 0:
            raise ConfigError(
                f"data.{key}_batch_size=0 but data.{key}_sources lists {len(sources)} source(s): they "
                f"would never be used; give data.{key}_batch_size >= 1 or remove the sources"
            )


def dump_config(cfg: Config) -> str:
    """The fully resolved config as YAML (written into every work dir)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
