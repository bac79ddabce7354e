"""Class lists and the :class:`Vocabulary` they are joined into.

Every source has its own class list (ADE-150 names, ADE-847 short names, COCO-Stuff merged names,
ImageNet synsets, or a custom file); each dataset format names its reader (larvseg.data.formats). An
experiment's vocabulary is their union *by normalised name* (larvseg.data.sources.build_vocabulary), so
COCO-Stuff's "wall-brick" (merged name "wall") and ADE's "wall" are one class. Labels and tags in the
data layer are union ids.

ImageNet synsets are named after the ADE class they are matched to (classlists/imagenet_for_ade*.json),
so IN124 / IN585 join ADE by that matching; other synsets by their first WordNet lemma. Lemmas shared by
several synsets (3,186 of 21,843 synsets: "crane" the bird and the machine) get their wnid appended,
"crane (n02012849)", so that no two synsets collapse into one class.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, overload

import numpy as np

from larvseg.data.io import EmptyDatasetError, require_dir
from larvseg.domains import classes_problem
from larvseg.errors import UserError

if TYPE_CHECKING:
    from larvseg.config import SourceConfig

CLASSLIST_DIR = Path(__file__).resolve().parent / "classlists"
MAX_CLASSES = 65535  # IGNORE_INDEX is 65535, labels are uint16


class VocabularyError(UserError, ValueError):
    """A class list that cannot be read or resolved."""

    hint = "fix the class list, or the config key the message names"


def normalize_name(name: str) -> str:
    """Lower case, '-' and '_' as spaces, single spaces: the key by which class lists are joined."""
    return re.sub(r"\s+", " ", re.sub(r"[-_]", " ", str(name).lower())).strip()


@cache
def _json(file_name: str) -> dict:
    return json.loads((CLASSLIST_DIR / file_name).read_text())


def coco_stuff_classes() -> list[dict]:
    """COCO-Stuff's 171 classes in train-id order: dicts with raw_id, train_id, name, merged_name."""
    return sorted(_json("coco_stuff171.json")["classes"], key=lambda c: c["train_id"])


def load_class_names(fmt: str) -> list[str]:
    """Class names of a packaged dataset format, in train-id order (COCO-Stuff: merged names)."""
    readers = {
        "ade150": lambda: list(_json("ade150.json")["classes"]),
        "ade847": lambda: [
            c["short_name"] for c in sorted(_json("ade847.json")["classes"], key=lambda c: c["train_id"])
        ],
        "coco171": lambda: [c["merged_name"] for c in coco_stuff_classes()],
    }
    if fmt not in readers:
        raise VocabularyError(f"no packaged class list for format {fmt!r}; packaged: {sorted(readers)}")
    return readers[fmt]()


@cache
def imagenet_synsets() -> dict[str, str]:
    """wnid -> first WordNet lemma, for all 21,843 ImageNet-21K synsets (canonical order)."""
    out: dict[str, str] = {}
    for line in (CLASSLIST_DIR / "imagenet21k_synsets.tsv").read_text().splitlines():
        if line and not line.startswith("#"):
            wnid, lemmas = line.split("\t", 1)
            out[wnid] = lemmas.split(",")[0].strip()
    return out


@cache
def imagenet_class_names(preferred: str = "ade847") -> dict[str, str]:
    """wnid -> class name used in vocabularies.

    A synset matched to an ADE class is named after it, so it joins that class. One synset
    (n04217882) is matched to different names in the two lists ("trade name" in ADE-150, "signboard"
    in ADE-847): the ``preferred`` matching ("ade150" or "ade847") wins. Other synsets are named by
    their first lemma; a lemma that, normalised, is shared by several unmatched synsets ("Cardigan"
    the dog, "cardigan" the sweater) or equals a matched ADE name (the fish "windowpane") gets its
    wnid appended, "cardigan (n02113186)", so that unrelated synsets never collapse into one class.
    """
    order = {
        "ade150": ("imagenet_for_ade847.json", "imagenet_for_ade150.json"),
        "ade847": ("imagenet_for_ade150.json", "imagenet_for_ade847.json"),
    }[preferred]
    matched: dict[str, str] = {}
    for file_name in order:  # the later file wins
        matched.update({c["wnid"]: c["name"] for c in _json(file_name)["classes"]})
    lemmas = {w: l for w, l in imagenet_synsets().items() if w not in matched}
    taken = Counter(normalize_name(l) for l in lemmas.values())
    taken.update({normalize_name(n): 2 for n in matched.values()})  # any clash with a matched name
    names = {w: (l if taken[normalize_name(l)] == 1 else f"{l} ({w})") for w, l in lemmas.items()}
    return {w: matched.get(w) or names[w] for w in imagenet_synsets()}


def read_wnid_file(path: Path) -> list[str]:
    """One wnid per line (anything after the first whitespace and '#' comments are ignored)."""
    if not path.is_file():
        raise VocabularyError(f"{path}: wnid list not found")
    wnids = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            wnids.append(line.split()[0])
    if not wnids:
        raise VocabularyError(f"{path}: the wnid list is empty")
    return wnids


def imagenet_subset(classes: str) -> list[str]:
    """The wnids of an ImageNet class subset: "ade150" (124), "ade847" (585), "all" (21,843) or a file."""
    presets = {
        "ade150": lambda: [c["wnid"] for c in _json("imagenet_for_ade150.json")["classes"]],
        "ade847": lambda: [c["wnid"] for c in _json("imagenet_for_ade847.json")["classes"]],
        "all": lambda: list(imagenet_synsets()),
    }
    if not classes:
        raise VocabularyError(
            "an imagenet source needs 'classes': set its classes key to ade150, ade847, all, or a file of wnids"
        )
    wnids = presets[classes]() if classes in presets else read_wnid_file(Path(classes).expanduser())
    known = imagenet_synsets()
    unknown = [w for w in wnids if w not in known]
    if unknown:
        raise VocabularyError(
            f"ImageNet class subset {classes!r}: {len(unknown)} unknown wnid(s), not among the 21,843 "
            f"ImageNet-21K synsets: {unknown[:10]}"
        )
    duplicates = [w for w, n in Counter(wnids).items() if n > 1]
    if duplicates:
        raise VocabularyError(f"ImageNet class subset {classes!r}: wnids listed twice: {duplicates[:10]}")
    return wnids


def imagenet_names(classes: str) -> list[str]:
    """Class names of an ImageNet subset, in its wnid order (ADE-150 matching preferred for "ade150")."""
    names = imagenet_class_names("ade150" if classes == "ade150" else "ade847")
    return [names[w] for w in imagenet_subset(classes)]


def read_class_file(path: Path) -> list[str]:
    """A custom class-name file: one name per line, blank lines and '#' comments ignored."""
    if not path.is_file():
        raise VocabularyError(f"{path}: class-name file not found")
    names = [l.split("#", 1)[0].strip() for l in path.read_text().splitlines()]
    names = [n for n in names if n]
    if not names:
        raise VocabularyError(f"{path}: the class-name file is empty")
    dup = [n for n, k in Counter(map(normalize_name, names)).items() if k > 1]
    if dup:
        raise VocabularyError(f"{path}: class names listed twice: {dup[:10]}")
    return names


class Vocabulary:
    """An ordered list of unique (normalised) class names; the index of a name is its union id."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names: list[str] = []
        self._index: dict[str, int] = {}
        for name in names:
            key = normalize_name(name)
            if key not in self._index:
                self._index[key] = len(self.names)
                self.names.append(key)
        if len(self.names) > MAX_CLASSES:
            raise VocabularyError(
                f"{len(self.names)} classes: vocabularies are limited to {MAX_CLASSES} (uint16 labels)"
            )

    @classmethod
    def union(cls, *name_lists: Sequence[str]) -> Vocabulary:
        return cls(name for names in name_lists for name in names)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: str) -> bool:
        return normalize_name(name) in self._index

    def index(self, name: str) -> int:
        try:
            return self._index[normalize_name(name)]
        except KeyError:
            raise KeyError(f"class {name!r} is not in the vocabulary ({len(self)} classes)") from None

    def ids(self, names: Sequence[str]) -> np.ndarray:
        """Union ids of ``names`` (int64)."""
        return np.array([self.index(n) for n in names], dtype=np.int64)

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} classes)"


class UnknownClassError(UserError, KeyError):
    """A class name asked for (``--classes``, ``classes=``, ``eval.classes``) that is not among the classes at hand."""

    hint = "check the spelling; the checkpoint's classes are listed in classes.json of any predict output"

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


@overload
def class_terms(classes: None) -> None: ...
@overload
def class_terms(classes: str | Sequence[str]) -> list[str]: ...
def class_terms(classes: str | Sequence[str] | None) -> list[str] | None:
    """The terms of a ``--classes`` value: None (all), a list of names, a comma-separated string, or a file
    with one name per line."""
    if classes is None:
        return None
    if isinstance(classes, str):
        path = Path(classes)
        if path.is_file():
            wanted = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        elif classes_problem(classes) is not None:  # "names.txt" that does not exist: not a class name
            raise UnknownClassError(f"classes {classes!r}: {classes_problem(classes)}")
        else:
            wanted = [c.strip() for c in classes.split(",") if c.strip()]
    else:
        wanted = [str(c).strip() for c in classes if str(c).strip()]
    if not wanted:
        raise UnknownClassError(f"no class names in {classes!r}")
    return wanted


def custom_seg_names(source: SourceConfig, folder: Path) -> list[str]:
    """The class file of a custom segmentation source: ``classes``, else ``<folder>/classes.txt``."""
    return read_class_file(Path(source.classes).expanduser() if source.classes else folder / "classes.txt")


def custom_tag_names(source: SourceConfig, folder: Path) -> list[str]:
    """The classes of a custom image-level source: its ``classes`` file, else every sub-folder of ``folder``."""
    if source.classes:
        return read_class_file(Path(source.classes).expanduser())
    root = require_dir(folder, "image-level folder")
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not names:
        raise EmptyDatasetError(root, "no class folders")
    return names
