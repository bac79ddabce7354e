"""``larvseg data check`` on tiny datasets: counts, coverage, every problem, exit code."""

from __future__ import annotations

import numpy as np
import tifffile

from larvseg.cli import main as cli_main
from larvseg.data import testing as T
from larvseg.data.vocabulary import imagenet_subset

WNIDS = imagenet_subset("ade847")[:3]


def write_config(root):
    (root / "w.txt").write_text("\n".join(WNIDS))
    cfg = root / "c.yaml"
    cfg.write_text(
        f"data:\n  root: {root}\n  index_cache_dir: {root / 'cache'}\n"
        "  seg_sources: [{name: C171, format: coco171, split: train2017}]\n"
        f"  tag_sources: [{{name: IN3, format: imagenet, classes: {root / 'w.txt'}}}, {{name: A150w, format: ade150}}]\n"
        "  eval: {name: A847, format: ade847, split: validation}\n"
    )
    return cfg


def test_data_check_counts_and_problems(tmp_path, capsys):
    T.write_coco171(tmp_path / "C171", n=3, size=(24, 24), values=[0, 2, 11])  # person, car, (11 = ignore)
    T.write_imagenet(tmp_path / "I22K", WNIDS, per_class=2, size=(16, 16))
    T.write_ade150(tmp_path / "A150", n=2, size=(24, 24), values=[0, 1, 150])
    T.write_ade847(tmp_path / "A847", n=4, size=(24, 24), values=[300, 846], split="validation")
    cfg = write_config(tmp_path)
    assert cli_main(["data", "check", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "[seg] C171 (coco171): 3 images, classes 2/160, ok" in out  # 171 train ids are 160 union names
    assert "[tag] IN3 (imagenet): 6 images, classes 3/3, ok" in out
    assert "[tag] A150w (ade150): 2 images, classes 2/150, ok" in out
    assert "[eval] A847 (ade847): 4 images, classes 2/847, ok" in out
    assert "4 sources, 0 problem(s)" in out

    assert cli_main(["data", "check", str(cfg), "--max-images", "2"]) == 0
    assert "[eval] A847 (ade847): 4 images, 2 decoded" in capsys.readouterr().out

    # break things: a bad label value, a truncated image, a missing annotation, an empty class folder
    labels = sorted((tmp_path / "A847/annotations/validation").glob("*.tif"))
    tifffile.imwrite(labels[0], np.full((24, 24), 900, np.uint16))
    image = sorted((tmp_path / "C171/images/train2017").glob("*.jpg"))[0]
    image.write_bytes(image.read_bytes()[:100])
    missing = sorted((tmp_path / "A150/annotations/training").glob("*.png"))[1]
    missing.unlink()
    for f in (tmp_path / "I22K/fall11_whole" / WNIDS[2]).iterdir():
        f.unlink()
    assert cli_main(["data", "check", str(cfg)]) == 1
    out = capsys.readouterr().out
    assert "[seg] C171 (coco171): 3 images, classes 2/160, 1 problem(s)" in out and f"{image}: cannot decode" in out
    assert (
        "[tag] IN3 (imagenet): 4 images, classes 2/3, 1 problem(s)" in out
        and f"{WNIDS[2]}: class folder holds no image" in out
    )
    assert (
        "[tag] A150w (ade150): 1 images, classes 2/150, 1 problem(s)" in out
        and f"annotation of {missing.stem}.jpg is missing" in out
    )
    assert (
        "[eval] A847 (ade847): 4 images, classes 2/847, 1 problem(s)" in out
        and f"{labels[0]}: " in out
        and "[900]" in out
    )
    assert "4 sources, 4 problem(s)" in out


def test_data_check_wrong_root(tmp_path, capsys):
    cfg = write_config(tmp_path)
    assert cli_main(["data", "check", str(cfg), f"data.root={tmp_path / 'nothing'}"]) == 1
    out = capsys.readouterr().out
    assert out.count("not found") >= 4 and "4 sources, 4 problem(s)" in out


def test_packaged_config_on_the_seed_readme_layout(tmp_path, capsys):
    """The original README's layout (C171/images/{training,validation}, A847, I22K) passes `data check`
    with a packaged config and no split override; the detected folder is printed."""
    T.write_coco171(tmp_path / "C171", n=2, size=(16, 16), split="training", values=[0, 2])
    T.write_coco171(tmp_path / "C171", n=1, size=(16, 16), split="validation", values=[0])
    T.write_ade847(tmp_path / "A847", n=2, size=(16, 16), values=[300, 846], split="training")
    T.write_ade847(tmp_path / "A847", n=2, size=(16, 16), values=[300], split="validation")
    T.write_imagenet(tmp_path / "I22K", imagenet_subset("ade847"), per_class=1, size=(8, 8))
    args = ["data", "check", "c171_a847w_in585", f"data.root={tmp_path}", f"data.index_cache_dir={tmp_path / 'cache'}"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert (
        "[seg] C171 (coco171): 2 images, classes 2/160, ok\n    split folder: training (detected; looked for train2017, training)"
        in out
    )
    assert "[tag] A847w (ade847): 2 images, classes 2/847, ok\n    split folder: training (as configured)" in out
    # no split line (no split folders); the training pipeline of each source: ImageNet its own (320, 320)
    assert (
        "[tag] IN585 (imagenet): 585 images, classes 585/585, ok\n    training: rescale to fit (320, 320) "
        "(its own scale) x ratio 0.5-2, crop 320 (not retried: no label map), pad to 320\n[eval]"
    ) in out
    assert (
        "training: rescale to fit (2048, 512) (data.scale) x ratio 0.5-2, crop 512 (retried while one class "
        "covers >= 0.75), pad to 512"
    ) in out
    assert "evaluation: resize to short side 512 (long side <= 2048), slide windows 512 / stride 512" in out
    assert "4 sources, 0 problem(s)" in out
    # an explicit split still wins: train2017 is not there, and the error says what is
    assert cli_main(args + ["data.seg_sources.0.split=train2017"]) == 1
    out = capsys.readouterr().out
    assert "[seg] C171 (coco171): 0 images" in out and "split folder not found" in out and "training, validation" in out


def test_data_check_reports_an_8bit_a847_tiff(tmp_path, capsys):
    T.write_coco171(tmp_path / "C171", n=2, size=(24, 24), values=[0, 2])
    T.write_imagenet(tmp_path / "I22K", WNIDS, per_class=1, size=(16, 16))
    T.write_ade150(tmp_path / "A150", n=2, size=(24, 24), values=[0, 1])
    labels = T.write_ade847(tmp_path / "A847", n=3, size=(24, 24), values=[300, 846], split="validation")
    bad = sorted((tmp_path / "A847" / "annotations" / "validation").glob("*.tif"))[1]
    # 8 bits: 255 is "unlabeled" there, but class 255 ("pier") in A847's 16-bit files
    tifffile.imwrite(bad, np.where(np.arange(24 * 24).reshape(24, 24) % 2, 255, 3).astype(np.uint8))
    assert labels  # written
    assert cli_main(["data", "check", str(write_config(tmp_path))]) == 1
    out = capsys.readouterr().out
    assert "[eval] A847 (ade847): 3 images, classes 2/847, 1 problem(s)" in out
    assert f"{bad}: 8-bit label map, but A847 annotations are 16-bit" in out and "'pier'" in out
