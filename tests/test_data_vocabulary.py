"""Class lists, union vocabularies and the base/novel split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from larvseg.config import Config, DataConfig, SourceConfig
from larvseg.data.sources import base_novel_split, build_vocabulary
from larvseg.data.testing import make_config
from larvseg.data.vocabulary import (
    CLASSLIST_DIR,
    Vocabulary,
    VocabularyError,
    imagenet_class_names,
    imagenet_names,
    imagenet_subset,
    load_class_names,
    normalize_name,
    read_class_file,
)


def reference_union(*lists):
    """Loop-based union by normalised name, first occurrence order."""
    out = []
    for names in lists:
        for n in names:
            key = " ".join(n.lower().replace("-", " ").replace("_", " ").split())
            if key not in out:
                out.append(key)
    return out


def test_normalize_name():
    assert normalize_name("  Television-Receiver ") == "television receiver"
    assert normalize_name("wall_brick--stone") == "wall brick stone"
    assert normalize_name("a \t b") == "a b"


def test_packaged_class_lists_follow_the_files():
    coco = json.loads((CLASSLIST_DIR / "coco_stuff171.json").read_text())["classes"]
    a847 = json.loads((CLASSLIST_DIR / "ade847.json").read_text())["classes"]
    assert load_class_names("coco171") == [c["merged_name"] for c in sorted(coco, key=lambda c: c["train_id"])]
    assert load_class_names("ade847")[300] == next(c["short_name"] for c in a847 if c["train_id"] == 300)
    assert len(load_class_names("ade150")) == 150 and load_class_names("ade150")[0] == "wall"
    with pytest.raises(VocabularyError, match="no packaged class list"):
        load_class_names("ade2000")


def test_c171_a847_union_and_base_novel_split(tmp_path):
    cfg = make_config(
        tmp_path, seg=[SourceConfig(name="C171", format="coco171")], tag=[SourceConfig(name="A847w", format="ade847")]
    )
    vocab = build_vocabulary(cfg)
    coco, a847 = load_class_names("coco171"), load_class_names("ade847")
    ref = reference_union(coco, a847)
    assert vocab.names == ref
    assert len(vocab) == 909  # 160 merged COCO names + 847 ADE short names - 98 shared
    assert vocab.index("television-receiver") == vocab.index("Television receiver") == ref.index("television receiver")
    ids, base = base_novel_split(vocab, cfg)
    assert ids.tolist() == [ref.index(normalize_name(n)) for n in a847]
    coco_keys = {normalize_name(n) for n in coco}
    assert base.tolist() == [normalize_name(n) in coco_keys for n in a847]
    assert base.sum() == 98


def test_c171_a150_base_classes(tmp_path):
    cfg = make_config(
        tmp_path,
        seg=[SourceConfig(name="C171", format="coco171")],
        eval_source=SourceConfig(name="A150", format="ade150", split="validation"),
    )
    vocab = build_vocabulary(cfg)
    ids, base = base_novel_split(vocab, cfg)
    assert len(vocab) == len(reference_union(load_class_names("coco171"), load_class_names("ade150"))) == 247
    assert len(ids) == 150 and base.sum() == 63  # the 63 base classes of ADE-150
    # a class with masks only in a *tag* source is novel
    cfg_w = make_config(
        tmp_path,
        tag=[SourceConfig(name="C171w", format="coco171")],
        eval_source=SourceConfig(name="A150", format="ade150"),
    )
    assert base_novel_split(build_vocabulary(cfg_w), cfg_w)[1].sum() == 0


def test_imagenet_subsets_join_ade_by_their_matching():
    in124, in585 = imagenet_subset("ade150"), imagenet_subset("ade847")
    assert (len(in124), len(set(in124)), len(in585), len(imagenet_subset("all"))) == (124, 124, 585, 21843)
    a150 = {normalize_name(n) for n in load_class_names("ade150")}
    a847 = {normalize_name(n) for n in load_class_names("ade847")}
    assert {normalize_name(n) for n in imagenet_names("ade150")} <= a150
    assert {normalize_name(n) for n in imagenet_names("ade847")} <= a847
    # n04217882 is matched to different names in the two lists: each subset uses its own
    assert imagenet_names("ade150")[in124.index("n04217882")] == "trade name"
    assert imagenet_names("ade847")[in585.index("n04217882")] == "signboard"
    cfg = Config(
        data=DataConfig(
            tag_sources=[SourceConfig(name="IN124", format="imagenet", classes="ade150")],
            eval=SourceConfig(format="ade150"),
        )
    )
    assert len(build_vocabulary(cfg)) == 150  # every IN124 synset is an ADE-150 class


def test_imagenet_21k_names_never_merge_unrelated_synsets():
    names = imagenet_class_names()
    assert len(names) == 21843
    assert names["n02662825"] == "windowpane (n02662825)"  # the fish, not ADE's windowpane (a window)
    assert normalize_name(names["n02113186"]) != normalize_name(names["n02963159"])  # Cardigan dog vs cardigan
    # names shared by several synsets only where they are matched to the same ADE class
    matched = {
        c["wnid"]
        for f in ("imagenet_for_ade150.json", "imagenet_for_ade847.json")
        for c in json.loads((CLASSLIST_DIR / f).read_text())["classes"]
    }
    by_name: dict[str, list[str]] = {}
    for w, n in names.items():
        by_name.setdefault(normalize_name(n), []).append(w)
    shared = [ws for ws in by_name.values() if len(ws) > 1]
    assert shared and all(set(ws) <= matched for ws in shared)


def test_wnid_files_and_class_files(tmp_path):
    good = imagenet_subset("ade847")[:2]
    f = tmp_path / "w.txt"
    f.write_text(f"# my subset\n{good[0]}  # comment\n\n{good[1]}\n")
    assert imagenet_subset(str(f)) == good
    f.write_text(f"{good[0]}\nn99999999\n")
    with pytest.raises(VocabularyError, match=r"unknown wnid.*n99999999"):
        imagenet_subset(str(f))
    f.write_text(f"{good[0]}\n{good[0]}\n")
    with pytest.raises(VocabularyError, match="twice"):
        imagenet_subset(str(f))
    f.write_text("\n# nothing\n")
    with pytest.raises(VocabularyError, match="empty"):
        imagenet_subset(str(f))
    with pytest.raises(VocabularyError, match="not found"):
        imagenet_subset(str(tmp_path / "missing.txt"))
    with pytest.raises(VocabularyError, match="needs 'classes'"):
        imagenet_subset("")
    c = tmp_path / "classes.txt"
    c.write_text("Red thing\nred-thing\n")
    with pytest.raises(VocabularyError, match="twice"):
        read_class_file(c)


def test_vocabulary_object():
    v = Vocabulary.union(["Wall", "sky"], ["wall", "tree"])
    assert v.names == ["wall", "sky", "tree"] and len(v) == 3 and "WALL" in v and "car" not in v
    assert v.ids(["tree", "wall"]).tolist() == [2, 0] and v.ids(["tree"]).dtype == np.int64
    with pytest.raises(KeyError, match="car"):
        v.index("car")
    with pytest.raises(VocabularyError, match="65535"):
        Vocabulary(str(i) for i in range(65536))


def test_data_root_default_and_env(monkeypatch):
    monkeypatch.delenv("LARVSEG_DATA", raising=False)
    assert DataConfig().resolved_root() == Path("/workspace/dataset")
    monkeypatch.setenv("LARVSEG_DATA", "/somewhere")
    assert DataConfig().resolved_root() == Path("/somewhere")
    assert DataConfig(root="/cfg").resolved_root() == Path("/cfg")


def test_a_missing_imagenet_class_list_names_the_key_to_set():
    from larvseg.config import load_config

    with pytest.raises(
        VocabularyError,
        match=r"^data\.tag_sources\.0 \(IN\): an imagenet source needs 'classes': set its "
        r"classes key to ade150",
    ):
        build_vocabulary(load_config("tiny_cpu", ["data.tag_sources.0.classes="]))
