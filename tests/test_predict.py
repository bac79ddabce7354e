"""`larvseg predict` and the LarvSegPredictor API on a tiny random checkpoint."""

from __future__ import annotations

import json
import re

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from larvseg.cli import build_parser
from larvseg.config import Config, EvalConfig, ModelConfig, SourceConfig
from larvseg.models.inference import segment_image
from larvseg.models.segmenter import build_segmenter
from larvseg.predict import (
    ImageReadError,
    LarvSegPredictor,
    UnknownClassError,
    eval_resize,
    main,
)
from larvseg.train.checkpoint import export_weights, save_checkpoint


def _checkpoint(path, names, seed=0):
    torch.manual_seed(seed)
    cfg = Config(
        model=ModelConfig(arch="vit_tiny", drop_path=0.0, memory_bank_size=2, cac=True),
        eval=EvalConfig(mode="slide", crop_size=48, stride=32, short_side=40),
    )
    segmenter = build_segmenter(cfg.model, len(names))
    save_checkpoint(path, {"model": segmenter.state_dict(), "config": cfg.to_dict(), "vocab": list(names)})
    return segmenter.eval(), cfg


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "small.pth"
    names = ["sky", "tree", "road", "person", "car", "building"]
    segmenter, cfg = _checkpoint(path, names)
    return path, names, segmenter, cfg


def _image(h, w, seed):
    rng = np.random.default_rng(seed)
    # smooth blobs so the random model's prediction has some structure
    small = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def test_api_numpy_and_pil_match_direct_segmentation(small):
    path, names, segmenter, cfg = small
    # amp off: the expectation below is float32 ("auto" is bf16 on CPUs with AMX)
    predictor = LarvSegPredictor.from_checkpoint(path, device="cpu", amp="off")
    image = _image(50, 70, 0)
    result = predictor(image)
    assert result.label_map.shape == (50, 70)
    assert result.class_names == names
    # the same pipeline by hand: eval resize (short side 40), slide inference, output at the input size
    resized = eval_resize(image, 40, 2048)
    assert resized.shape[:2] == (40, 56)
    chw = torch.from_numpy(resized).permute(2, 0, 1)
    expected = segment_image(
        segmenter, chw, EvalConfig(mode="slide", crop_size=48, stride=32, amp="off"), out_size=(50, 70)
    ).numpy()
    np.testing.assert_array_equal(result.label_map, expected)
    counts = np.bincount(expected.ravel(), minlength=len(names))
    assert result.areas == pytest.approx({names[i]: counts[i] / expected.size for i in np.flatnonzero(counts)})
    assert sum(result.areas.values()) == pytest.approx(1.0)
    assert list(result.areas.values()) == sorted(result.areas.values(), reverse=True)

    from_pil = predictor(Image.fromarray(image))
    np.testing.assert_array_equal(from_pil.label_map, result.label_map)
    # the safetensors export (no memory bank) predicts the same
    exported = export_weights(path.parent / "final.safetensors", segmenter.state_dict(), cfg.to_dict(), names, 1)
    np.testing.assert_array_equal(
        LarvSegPredictor.from_checkpoint(exported, device="cpu", amp="off")(image).label_map, result.label_map
    )

    restricted = LarvSegPredictor.from_checkpoint(path, classes="Road, person", device="cpu")(image)
    assert set(np.unique(restricted.label_map)) <= {2, 3}
    with pytest.raises(UnknownClassError, match="unicorn"):
        LarvSegPredictor.from_checkpoint(path, classes=["sky", "unicorn"], device="cpu")
    with pytest.raises(ImageReadError, match="HxWx3"):
        predictor(np.zeros((4, 4, 2), dtype=np.uint8))


def test_cli_writes_label_maps_overlays_and_areas(small, tmp_path):
    path, names, _, _ = small
    folder = tmp_path / "imgs"
    folder.mkdir()
    images = {"a": _image(40, 60, 1), "b": _image(64, 48, 2)}
    for stem, im in images.items():
        Image.fromarray(im).save(folder / f"{stem}.png")
    (folder / "notes.txt").write_text("not an image, not picked up from a folder")
    extra = tmp_path / "c.jpg"
    Image.fromarray(_image(36, 36, 3)).save(extra, quality=95)
    out = tmp_path / "out"
    args = build_parser().parse_args(
        ["predict", str(path), str(folder), str(extra), "--out", str(out), "--device", "cpu", "--short-side", "40"]
    )
    assert main(args) == 0

    predictor = LarvSegPredictor.from_checkpoint(path, device="cpu", short_side=40)
    areas = json.loads((out / "areas.json").read_text())
    assert json.loads((out / "classes.json").read_text()) == names
    assert len(areas) == 3
    for src in [folder / "a.png", folder / "b.png", extra]:
        entry = areas[str(src)]
        labels = cv2.imread(str(out / entry["labels"]), cv2.IMREAD_UNCHANGED)
        image = np.asarray(Image.open(src).convert("RGB"))
        assert labels.dtype == np.uint8 and labels.shape == image.shape[:2]
        np.testing.assert_array_equal(labels, predictor(image).label_map)
        assert sum(entry["areas"].values()) == pytest.approx(1.0)
        counts = np.bincount(labels.ravel(), minlength=len(names))
        assert entry["areas"] == pytest.approx({names[i]: counts[i] / labels.size for i in np.flatnonzero(counts)})
        overlay = cv2.imread(str(out / entry["overlay"]))
        assert overlay.shape[1] > image.shape[1] and overlay.shape[0] >= image.shape[0]
        # the legend panel is not blank: it names the classes present
        assert (overlay[:, image.shape[1] :] < 128).any()


def test_cli_16bit_label_maps_for_large_vocabulary(tmp_path):
    names = [f"class {i}" for i in range(300)]
    path = tmp_path / "big.pth"
    _checkpoint(path, names, seed=1)
    src = tmp_path / "x.png"
    Image.fromarray(_image(40, 40, 4)).save(src)
    out = tmp_path / "out"
    args = build_parser().parse_args(
        [
            "predict",
            str(path),
            str(src),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--classes",
            "class 3,class_280,Class 299",
            "--short-side",
            "0",
        ]
    )
    assert main(args) == 0
    labels = cv2.imread(str(out / "x_labels.png"), cv2.IMREAD_UNCHANGED)
    assert labels.dtype == np.uint16
    assert set(np.unique(labels)) <= {3, 280, 299} and labels.max() >= 280  # ids > 255 survive
    expected = LarvSegPredictor.from_checkpoint(
        path, classes=["class 3", "class 280", "class 299"], device="cpu", short_side=0
    )
    np.testing.assert_array_equal(labels, expected(np.asarray(Image.open(src).convert("RGB"))).label_map)


def test_cli_unreadable_image_names_the_file(small, tmp_path, capsys):
    path = small[0]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    args = build_parser().parse_args(["predict", str(path), str(bad), "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert main(args) == 1  # reported and skipped, not a crash
    assert "broken.jpg: cannot decode image" in capsys.readouterr().err
    args = build_parser().parse_args(
        ["predict", str(path), str(tmp_path / "missing.png"), "--out", str(tmp_path / "o")]
    )
    with pytest.raises(ImageReadError, match="missing.png"):
        main(args)


def test_predict_defaults_to_the_eval_resize_and_gives_the_label_maps_eval_scores(tmp_path, monkeypatch, capsys):
    """`larvseg predict` without --short-side resizes like `larvseg eval` (the checkpoint's eval.short_side,
    here 40, not 512): on the evaluation images it writes exactly the label maps that eval scores."""
    import larvseg.eval.evaluate as evaluate_mod
    from larvseg.cli import main as cli_main
    from larvseg.config import dump_config
    from larvseg.data import testing as T
    from larvseg.data.sources import build_vocabulary

    names = ["sky", "tree", "road", "person"]
    T.write_custom_seg(tmp_path / "myseg", names, n=3, size=(48, 70))
    seg = SourceConfig(name="mine", format="custom_seg", root="myseg")
    cfg = T.make_config(tmp_path, seg=[seg], eval_source=SourceConfig(name="mine", format="custom_seg", root="myseg"))
    cfg.model = ModelConfig(arch="vit_tiny", drop_path=0.0, cac=False)
    cfg.eval = EvalConfig(mode="slide", crop_size=48, stride=32, short_side=40, amp="off")
    cfg.train.device = "cpu"  # eval on the CPU like predict --device cpu, also where a GPU is visible
    (tmp_path / "cfg.yaml").write_text(dump_config(cfg))
    vocab = build_vocabulary(cfg)
    torch.manual_seed(0)
    segmenter = build_segmenter(cfg.model, len(vocab))
    ckpt = tmp_path / "ckpt.pth"
    save_checkpoint(ckpt, {"model": segmenter.state_dict(), "config": cfg.to_dict(), "vocab": list(vocab.names)})

    scored = []
    real = evaluate_mod.segment_image

    def recording(*args, **kwargs):
        pred = real(*args, **kwargs)
        if kwargs.get("out_size") is not None:  # the scored maps (eval's overlays are drawn at model size)
            scored.append(pred.cpu().clone())
        return pred

    monkeypatch.setattr(evaluate_mod, "segment_image", recording)
    assert cli_main(["eval", str(tmp_path / "cfg.yaml"), str(ckpt), "--out", str(tmp_path / "ev")]) == 0
    assert len(scored) == 3
    out = tmp_path / "pred"
    assert (
        cli_main(
            [
                "predict",
                str(ckpt),
                str(tmp_path / "myseg" / "images"),
                "--out",
                str(out),
                "--device",
                "cpu",
                "--amp",
                "off",
            ]
        )
        == 0
    )  # as eval.amp here ("auto" is bf16 on CPUs with AMX)
    for i, expected in enumerate(scored):
        labels = cv2.imread(str(out / f"img{i}_labels.png"), cv2.IMREAD_UNCHANGED)
        assert labels.shape == (48, 70)
        np.testing.assert_array_equal(labels, expected.numpy())
    # the flag still overrides: another size gives other maps
    assert (
        cli_main(
            [
                "predict",
                str(ckpt),
                str(tmp_path / "myseg" / "images"),
                "--out",
                str(tmp_path / "p64"),
                "--device",
                "cpu",
                "--amp",
                "off",
                "--short-side",
                "64",
            ]
        )
        == 0
    )
    other = [cv2.imread(str(tmp_path / "p64" / f"img{i}_labels.png"), cv2.IMREAD_UNCHANGED) for i in range(3)]
    assert any(not np.array_equal(o, e.numpy()) for o, e in zip(other, scored))


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line and "window" not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_folder_with_an_unreadable_image_writes_the_others_and_exits_1(small, tmp_path, capsys):
    path, names, _, _ = small
    folder = tmp_path / "imgs"
    folder.mkdir()
    for stem, seed in (("a", 1), ("c", 2)):
        Image.fromarray(_image(40, 44, seed)).save(folder / f"{stem}.png")
    (folder / "b.jpg").write_bytes(b"\xff\xd8\xff truncated")
    out = tmp_path / "out"
    from larvseg.cli import main as cli_main

    assert (
        cli_main(["predict", str(path), str(folder), "--out", str(out), "--device", "cpu", "--short-side", "40"]) == 1
    )
    err = capsys.readouterr().err
    assert f"1 of 3 image(s) could not be read and were skipped:\n  {folder / 'b.jpg'}: cannot decode image" in err
    areas = json.loads((out / "areas.json").read_text())
    assert sorted(areas) == [str(folder / "a.png"), str(folder / "c.png")]
    for entry in areas.values():
        assert (out / entry["labels"]).is_file() and (out / entry["overlay"]).is_file()
    assert json.loads((out / "classes.json").read_text()) == names


def test_full_disk_leaves_no_partial_output_and_one_line(small, tmp_path, capsys, monkeypatch):
    from larvseg import atomic
    from larvseg.cli import main as cli_main

    src = tmp_path / "x.png"
    Image.fromarray(_image(30, 30, 5)).save(src)
    out = tmp_path / "out"
    monkeypatch.setattr(atomic, "_open_temp", lambda tmp: open("/dev/full", "wb"))  # ENOSPC on every write
    assert cli_main(["predict", str(small[0]), str(src), "--out", str(out), "--device", "cpu"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert f"{out / 'classes.json'}: could not be written (No space left on device" in line and "disk is full" in line
    assert list(out.iterdir()) == []  # no 0-byte classes.json


def test_weights_and_json_of_different_vocabularies_is_one_line(small, tmp_path, capsys):
    from larvseg.cli import main as cli_main

    path, names, segmenter, cfg = small
    exported = export_weights(tmp_path / "final.safetensors", segmenter.state_dict(), cfg.to_dict(), names, 1)
    meta = json.loads(exported.with_suffix(".json").read_text())
    meta["vocab"] = names + ["extra"]
    exported.with_suffix(".json").write_text(json.dumps(meta))
    src = tmp_path / "x.png"
    Image.fromarray(_image(30, 30, 5)).save(src)
    assert cli_main(["predict", str(exported), str(src), "--out", str(tmp_path / "o")]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "final.safetensors: the weights hold 6 classes" in line and "final.json lists 7" in line


def test_16bit_grey_png_is_converted_by_range(small, tmp_path):
    path = small[0]
    grey8 = _image(40, 48, 6)[..., 0]
    grey16 = grey8.astype(np.uint16) * 257  # the same picture in 16 bits
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    out = tmp_path / "out"
    args = build_parser().parse_args(
        ["predict", str(path), str(tmp_path / "g16.png"), "--out", str(out), "--device", "cpu", "--short-side", "40"]
    )
    assert main(args) == 0
    labels = cv2.imread(str(out / "g16_labels.png"), cv2.IMREAD_UNCHANGED)
    expected = LarvSegPredictor.from_checkpoint(path, device="cpu")(np.repeat(grey8[:, :, None], 3, axis=2)).label_map
    np.testing.assert_array_equal(labels, expected)


def test_default_vocabulary_is_the_supervised_classes_and_untrained_names_warn(small, tmp_path):
    _, names, segmenter, cfg = small
    path = tmp_path / "trained.pth"
    save_checkpoint(
        path, {"model": segmenter.state_dict(), "config": cfg.to_dict(), "vocab": names, "supervised": [0, 3, 4]}
    )  # sky, person, car had masks or tags
    predictor = LarvSegPredictor.from_checkpoint(path, device="cpu")
    assert predictor.class_ids.tolist() == [0, 3, 4]
    assert set(np.unique(predictor(_image(50, 60, 7)).label_map)) <= {0, 3, 4}
    with pytest.warns(UserWarning, match=r"no training data in this checkpoint .*\['tree'\]"):
        named = LarvSegPredictor.from_checkpoint(path, classes="sky,tree", device="cpu")
    assert named.class_ids.tolist() == [0, 1]  # still what was asked for
    exported = export_weights(
        tmp_path / "final.safetensors", segmenter.state_dict(), cfg.to_dict(), names, 1, supervised=[2, 5]
    )
    assert LarvSegPredictor.from_checkpoint(exported, device="cpu").class_ids.tolist() == [2, 5]


def test_progress_per_image_and_per_window(small, tmp_path, capsys, monkeypatch):
    import larvseg.progress

    monkeypatch.setattr(larvseg.progress, "_is_terminal", lambda stream: True)  # bars: as on a terminal
    path = small[0]  # slide mode, crop 48, stride 32
    big = tmp_path / "big.png"
    Image.fromarray(_image(64, 160, 8)).save(big)
    Image.fromarray(_image(40, 40, 9)).save(tmp_path / "small.png")
    args = build_parser().parse_args(
        [
            "predict",
            str(path),
            str(big),
            str(tmp_path / "small.png"),
            "--out",
            str(tmp_path / "o"),
            "--device",
            "cpu",
            "--short-side",
            "0",
        ]
    )
    assert main(args) == 0
    err = capsys.readouterr().err
    predictor = LarvSegPredictor.from_checkpoint(path, device="cpu", short_side=0)
    windows = predictor.windows((64, 160))
    assert windows == 2 * 5
    assert re.search(rf"big\.png:\s+\d+%\|.*?\| \d+/{windows} \[.*?window/s", err)  # a bar inside the image
    assert not re.search(r"small\.png:\s+\d+%", err)  # one window: no inner bar
    assert "predict: 100%" in err and "2/2" in err


def test_progress_in_a_log_file_is_plain_lines(small, tmp_path, capsys):
    """Not a terminal (a CI log, nohup): plain lines, never a carriage return (one endless line in a file)."""
    path = small[0]
    for k in range(3):
        Image.fromarray(_image(40, 40, k)).save(tmp_path / f"im{k}.png")
    args = build_parser().parse_args(
        ["predict", str(path), str(tmp_path), "--out", str(tmp_path / "o"), "--device", "cpu"]
    )
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "predict: 3/3 (100%)" in err, err


def test_a_one_pixel_high_strip_is_segmented(tmp_path):
    names = ["sky", "tree", "road"]
    torch.manual_seed(0)
    cfg = Config(
        model=ModelConfig(arch="vit_tiny", drop_path=0.0, cac=False),
        eval=EvalConfig(mode="whole", short_side=64, max_long_side=128),
    )  # 1 x 2000 -> 0 x 128 before
    path = tmp_path / "m.pth"
    save_checkpoint(
        path, {"model": build_segmenter(cfg.model, 3).state_dict(), "config": cfg.to_dict(), "vocab": names}
    )
    Image.fromarray(np.full((1, 2000, 3), 90, np.uint8)).save(tmp_path / "strip.png")
    args = build_parser().parse_args(["predict", str(path), str(tmp_path / "strip.png"), "--out", str(tmp_path / "o")])
    assert main(args) == 0
    assert cv2.imread(str(tmp_path / "o" / "strip_labels.png"), cv2.IMREAD_UNCHANGED).shape == (1, 2000)


def test_checkpoint_without_weights_or_of_another_arch_is_one_line(small, tmp_path, capsys):
    from larvseg.cli import main as cli_main

    path, names, segmenter, cfg = small
    src = tmp_path / "x.png"
    Image.fromarray(_image(30, 30, 5)).save(src)
    no_model = tmp_path / "no_model.pth"
    save_checkpoint(no_model, {"config": cfg.to_dict(), "vocab": list(names)})
    assert cli_main(["predict", str(no_model), str(src), "--out", str(tmp_path / "o1")]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "no_model.pth: no 'model' entry" in line
    # the config says vit_small, the weights are vit_tiny's: shapes differ
    other = cfg.to_dict()
    other["model"]["arch"] = "vit_small"
    wrong = tmp_path / "wrong_arch.pth"
    save_checkpoint(wrong, {"model": segmenter.state_dict(), "config": other, "vocab": list(names)})
    assert cli_main(["predict", str(wrong), str(src), "--out", str(tmp_path / "o2")]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "wrong_arch.pth: weights do not fit model.arch='vit_small'" in line and "other shape" in line
