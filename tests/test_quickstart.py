"""What a new user runs first: the packaged smoke config as is, and the README's Python snippet after
the demo (extracted from README.md, run verbatim)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import pytest

from larvseg.cli import main as cli_main
from larvseg.train.checkpoint import FINAL_WEIGHTS, load_checkpoint

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """A folder where `larvseg train tiny_cpu` ran with no argument (as on a fresh clone)."""
    cwd = tmp_path_factory.mktemp("fresh")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        assert cli_main(["train", "tiny_cpu"]) == 0  # failed before: "imagenet source needs 'classes'"
    return cwd


def test_tiny_cpu_runs_as_is_and_records_the_supervised_classes(fresh):
    from larvseg.data.synthetic import DEMO_CLASSES
    from larvseg.predict import LarvSegPredictor

    work = fresh / "work_dirs" / "tiny_cpu"
    assert (fresh / "work_dirs" / "tiny_cpu_data" / "benchmark.json").is_file()  # generated on first use
    ckpt = load_checkpoint(work / "iter_00000002.pth")
    supervised = [ckpt["vocab"][i] for i in ckpt["supervised"]]
    # 909 classes in the vocabulary; only some of the benchmark's classes had masks or tags in 2 steps
    assert len(ckpt["vocab"]) > 800 and 0 < len(supervised) <= len(DEMO_CLASSES)
    assert set(supervised) <= {c.name for c in DEMO_CLASSES}
    exported = json.loads((work / "final.json").read_text())
    assert exported["supervised"] == ckpt["supervised"]
    predictor = LarvSegPredictor.from_checkpoint(work / FINAL_WEIGHTS, device="cpu")
    assert predictor.class_ids.tolist() == ckpt["supervised"]  # predict's default vocabulary


def test_readme_python_snippet_runs_verbatim_after_the_demo(fresh, monkeypatch):
    from larvseg.data.synthetic import SMOKE_SPEC, BenchmarkLayout, ensure_benchmark
    from larvseg.demo.run import LARVSEG, run_dir

    text = README.read_text()
    section = text[text.index("### Python API") :]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    # what `larvseg demo` leaves in work_dirs/demo, in the paths the demo uses (a short run stands in
    # for the demo's LarvSeg model, the small benchmark for its data: same layout, same file names)
    monkeypatch.chdir(fresh)
    demo = Path("work_dirs/demo")
    layout = ensure_benchmark(demo / "data", SMOKE_SPEC)
    target = run_dir(demo, 0, LARVSEG)
    target.mkdir(parents=True)
    for suffix in (".safetensors", ".json"):
        shutil.copy(fresh / "work_dirs" / "tiny_cpu" / f"final{suffix}", target / f"final{suffix}")
    assert f'"{target / FINAL_WEIGHTS}"' in snippet  # the checkpoint the demo writes for LarvSeg
    assert str(BenchmarkLayout(demo / "data").eval_images) in snippet and layout.eval_images.is_dir()

    printed = io.StringIO()
    namespace: dict = {}
    with contextlib.redirect_stdout(printed):
        exec(compile(snippet, "README.md", "exec"), namespace)  # verbatim
    prediction = namespace["prediction"]
    assert prediction.label_map.shape == namespace["image"].size[::-1]
    assert str(prediction.areas) in printed.getvalue() and sum(prediction.areas.values()) == pytest.approx(1.0)
