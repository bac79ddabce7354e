"""Packaged experiment configs, and the loader's checks: unknown keys, overrides, _base_ inheritance."""

from __future__ import annotations

import pytest

from larvseg.config import CONFIG_DIR, ConfigError, load_config

PAPER = ["c171_a150w", "c171_a847w", "c171_a150w_in124", "c171_a847w_in585", "c171_in124", "c171_in585", "c171_in21k"]


def test_every_packaged_config_loads():
    # their constants, against the original configs: tests/test_reproductions.py
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    expected = set(PAPER) | {f"{n}_baseline" for n in PAPER} | {"c171_seg_only_ade150", "c171_seg_only_ade847"}
    assert expected <= set(names)
    for name in names:
        cfg = load_config(name)
        assert cfg.name == name


def test_unknown_key_is_an_error_naming_it(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("_base_: c171_a150w\ntrain:\n  iterz: 5\n")
    with pytest.raises(ConfigError, match=r"train\.iterz.*did you mean 'iters'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"model\.cak"):
        load_config("c171_a150w", ["model.cak=false"])
    with pytest.raises(ConfigError, match=r"train\.lr: expected a number"):
        load_config("c171_a150w", ["train.lr=fast"])


def test_overrides(tmp_path):
    cfg = load_config(
        "c171_a150w_in124",
        ["train.iters=10", "model.cac=false", "data.tag_sources.1.share=0.25", "train.work_dir=" + str(tmp_path)],
    )
    assert cfg.train.iters == 10 and cfg.model.cac is False
    assert [s.share for s in cfg.data.tag_sources] == [3.0, 0.25]
    assert cfg.work_dir() == tmp_path
    with pytest.raises(ConfigError, match="not an index"):
        load_config("c171_a150w", ["data.tag_sources.3.share=1"])


def test_base_inheritance_merges_mappings_and_replaces_lists(tmp_path):
    (tmp_path / "a.yaml").write_text(
        "model: {arch: vit_tiny, drop_path: 0.0}\n"
        "data:\n  seg_sources: [{name: S1, format: custom_seg}, {name: S2, format: custom_seg}]\n"
        "train: {iters: 7, lr: 0.5}\n"
    )
    (tmp_path / "b.yaml").write_text(
        "_base_: a.yaml\ntrain: {iters: 9}\ndata:\n  seg_sources: [{name: S3, format: custom_seg}]\n"
    )
    (tmp_path / "c.yaml").write_text("_base_: b.yaml\nmodel: {cac: false}\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.name == "c"
    assert (cfg.model.arch, cfg.model.drop_path, cfg.model.cac) == ("vit_tiny", 0.0, False)
    assert (cfg.train.iters, cfg.train.lr) == (9, 0.5)
    assert [s.name for s in cfg.data.seg_sources] == ["S3"]
    # a packaged config as base, by name
    (tmp_path / "d.yaml").write_text("_base_: c171_a847w\ntrain: {iters: 3}\n")
    d = load_config(tmp_path / "d.yaml")
    assert d.train.iters == 3 and d.data.tag_sources[0].name == "A847w" and d.train.lr == 1e-3
    (tmp_path / "loop.yaml").write_text("_base_: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "loop.yaml")


def test_numbers_are_read_as_python_reads_them(tmp_path):
    # YAML 1.1 reads 1e-3 and 1.0e10 as strings ("not a number" before); every float Python accepts works
    path = tmp_path / "exp.yaml"
    path.write_text("_base_: tiny_cpu\ntrain: {lr: 1e-3, min_lr: 1E-6}\ndata: {ratio_range: [5e-1, 2e0]}\n")
    cfg = load_config(
        path,
        [
            "model.bg_mse_thresh=1.0e10",
            "train.momentum=.95",
            "train.iters=2e3",
            "data.cat_max_ratio='7.5e-1'",
            "train.weight_decay=1_000.5e-8",
        ],
    )
    assert (cfg.train.lr, cfg.train.min_lr) == (1e-3, 1e-6)
    assert cfg.data.ratio_range == [0.5, 2.0]
    assert cfg.model.bg_mse_thresh == 1e10 and cfg.train.momentum == 0.95
    assert cfg.train.iters == 2000 and isinstance(cfg.train.iters, int)
    assert cfg.data.cat_max_ratio == 0.75  # a quoted number in a number field
    assert cfg.train.weight_decay == pytest.approx(1000.5e-8)
    # YAML 1.1 would also read off/on/yes/no as booleans: amp=off reached the string key as 'False'
    assert load_config(path, ["train.amp=off", "eval.amp=off"]).train.amp == "off"
    with pytest.raises(ConfigError, match=r"train\.lr: expected a number, got 'fast'"):
        load_config(path, ["train.lr=fast"])
    with pytest.raises(ConfigError, match=r"train\.iters: expected an integer"):
        load_config(path, ["train.iters=1.5e0"])
