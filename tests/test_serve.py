"""`larvseg serve`: the HTTP API on a tiny random checkpoint, and the page driven in a real browser
(headless Chromium through Playwright)."""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from larvseg.config import Config, EvalConfig, ModelConfig
from larvseg.models.segmenter import build_segmenter
from larvseg.predict import LarvSegPredictor
from larvseg.train.checkpoint import save_checkpoint
from live_server import chromium, serving

pytest.importorskip("fastapi", reason="the [web] extra is not installed")
pytest.importorskip("httpx", reason="fastapi.testclient needs httpx (the [test] extra)")
from fastapi.testclient import TestClient

from larvseg.serve import SegmentationService, create_app

NAMES = ["sky", "tree", "road", "person", "car", "building", "unicornfish"]  # the last one is in no preset


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    cfg = Config(
        model=ModelConfig(arch="vit_mini", drop_path=0.0, cac=False),
        eval=EvalConfig(mode="slide", crop_size=48, stride=32, short_side=64),
    )
    segmenter = build_segmenter(cfg.model, len(NAMES))
    path = tmp_path_factory.mktemp("serve") / "small.pth"
    save_checkpoint(path, {"model": segmenter.state_dict(), "config": cfg.to_dict(), "vocab": NAMES})
    return path


def _service(ckpt, **limits) -> SegmentationService:
    return SegmentationService(LarvSegPredictor.from_checkpoint(ckpt, device="cpu"), str(ckpt), **limits)


def _photo(h: int = 90, w: int = 120, seed: int = 0) -> np.ndarray:
    small = np.random.default_rng(seed).integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _wait(client: TestClient, job: str) -> dict:
    for _ in range(600):
        status = client.get(f"/api/jobs/{job}").json()
        assert 0.0 <= status["progress"] <= 1.0
        if status["state"] in ("done", "error"):
            return status
        time.sleep(0.05)
    raise AssertionError(f"job {job} did not finish: {status}")


def test_api_segments_and_returns_label_map_and_areas(ckpt):
    service = _service(ckpt)
    client = TestClient(create_app(service))
    assert "<title>LarvSeg</title>" in client.get("/").text
    info = client.get("/api/info").json()
    presets = {p["key"]: p for p in info["presets"]}
    assert presets["model"]["known"] == 7
    assert presets["ade150"]["known"] == 6 and presets["ade150"]["total"] == 150  # sky tree road person car building
    assert presets["in21k"]["total"] == 21843
    assert client.get("/api/classes").json() == NAMES

    photo = _photo()
    r = client.post(
        "/api/segment",
        params={"preset": "custom", "classes": "Sky, road,PERSON", "name": "street.png"},
        content=_encode(Image.fromarray(photo)),
    )
    assert r.status_code == 202, r.text
    job = r.json()["job"]
    status = _wait(client, job)
    assert status["state"] == "done" and status["progress"] == 1.0, status
    # the progress unit is the sliding window: 90x120 -> 64x85 (short side 64), 48-px crops, stride 32: 2 x 3
    assert status["windows_done"] == status["windows_total"] == 6
    result = status["result"]
    download = client.get(f"/api/jobs/{job}/labels.png")
    assert download.headers["content-disposition"] == 'inline; filename="street_labels.png"'
    labels = cv2.imdecode(np.frombuffer(download.content, np.uint8), cv2.IMREAD_UNCHANGED)
    expected = LarvSegPredictor.from_checkpoint(ckpt, classes=["sky", "road", "person"], device="cpu")(photo)
    assert labels.dtype == np.uint8 and labels.shape == photo.shape[:2]
    np.testing.assert_array_equal(labels, expected.label_map)
    counts = np.bincount(labels.ravel(), minlength=len(NAMES))
    rows = result["classes"]
    assert {r["name"] for r in rows} <= {"sky", "road", "person"} and len(rows) >= 2
    assert [r["pixels"] for r in rows] == sorted((r["pixels"] for r in rows), reverse=True)
    for row in rows:
        assert row["pixels"] == counts[row["id"]] and NAMES[row["id"]] == row["name"]
        assert row["fraction"] == pytest.approx(counts[row["id"]] / labels.size)
    assert result["num_scored_classes"] == 3
    overlay = cv2.imdecode(
        np.frombuffer(client.get(f"/api/jobs/{job}/overlay.png").content, np.uint8), cv2.IMREAD_COLOR
    )
    assert overlay.shape == photo.shape
    assert json.loads(client.get(f"/api/jobs/{job}/classes.json").content) == NAMES

    # a preset: the names this model lacks are counted in a notice, the others scored
    r = client.post(
        "/api/segment", params={"preset": "ade150", "name": "street.png"}, content=_encode(Image.fromarray(photo))
    )
    status = _wait(client, r.json()["job"])
    assert status["result"]["num_scored_classes"] == 6
    assert any("144 of its classes are not in this model's trained vocabulary" in n for n in status["notices"])
    service.close()


def _grey16(h=40, w=50) -> bytes:
    ramp = np.tile(np.linspace(0, 65535, w), (h, 1)).astype(np.uint16)
    ok, buf = cv2.imencode(".png", ramp)
    return buf.tobytes()


def _rgb16(h=40, w=50) -> bytes:
    ok, buf = cv2.imencode(".png", _photo(h, w)[:, :, ::-1].astype(np.uint16) * 257)  # cv2 writes BGR
    return buf.tobytes()


@pytest.mark.parametrize(
    "name, make, params, status, message",
    [
        ("notes.txt", lambda: b"not an image at all", {}, 415, "notes.txt: not an image that can be read"),
        ("empty.png", lambda: b"", {}, 400, "empty.png: the upload is empty"),
        ("cut.png", lambda: _encode(Image.fromarray(_photo()))[:300], {}, 415, "cut.png: the image cannot be decoded"),
        ("big.jpg", lambda: os.urandom(70_000), {}, 413, "big.jpg: the file is"),
        (
            "wide.png",
            lambda: _encode(Image.new("L", (3000, 400))),
            {},
            413,
            "1.2 megapixels; the limit is 1 megapixels",
        ),
        (
            "a.png",
            lambda: _encode(Image.fromarray(_photo())),
            {"preset": "custom", "classes": "sky, unicorn"},
            400,
            "unicorn",
        ),
        (
            "a.png",
            lambda: _encode(Image.fromarray(_photo())),
            {"preset": "custom", "classes": " , "},
            400,
            "type at least one class",
        ),
        ("a.png", lambda: _encode(Image.fromarray(_photo())), {"preset": "pascal"}, 400, "unknown vocabulary 'pascal'"),
    ],
)
def test_api_rejects_bad_uploads_with_a_clear_message(ckpt, name, make, params, status, message):
    service = _service(ckpt, max_upload_mb=0.05, max_megapixels=1.0)
    client = TestClient(create_app(service))
    r = client.post("/api/segment", params={"name": name, **params}, content=make())
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert service.jobs == {}  # nothing ran
    service.close()


def test_api_converts_cmyk_and_16_bit_with_a_notice(ckpt):
    service = _service(ckpt)
    client = TestClient(create_app(service))
    photo = _photo()
    cases = {
        "print.jpg": (_encode(Image.fromarray(photo).convert("CMYK"), "JPEG"), "is a CMYK image"),
        "grey16.png": (_grey16(), "has 16 bits per channel"),
        "rgb16.png": (_rgb16(), "has 16 bits per channel"),
    }
    for name, (data, notice) in cases.items():
        r = client.post("/api/segment", params={"name": name}, content=data)
        assert r.status_code == 202, r.text
        status = _wait(client, r.json()["job"])
        assert status["state"] == "done" and any(notice in n for n in status["notices"]), status
    # 16-bit grey is scaled to 0..255 (not clipped at 255): the segmented image is the ramp scaled down
    from larvseg.serve import decode_upload

    rgb, _ = decode_upload(_grey16(), "grey16.png", 2**20, 10**6)
    assert rgb.dtype == np.uint8 and rgb[0, 0, 0] == 0 and rgb[0, -1, 0] == 255 and rgb[0, 25, 0] in range(120, 136)
    rgb, _ = decode_upload(_rgb16(), "rgb16.png", 2**20, 10**6)
    np.testing.assert_array_equal(rgb, _photo(40, 50))  # v * 257 -> v: the high byte of each channel
    service.close()


# ----------------------------------------------------------------------------------------------
# In a real browser


@pytest.fixture
def live_server(ckpt):
    pytest.importorskip("uvicorn", reason="the [web] extra is not installed")
    with serving(_service(ckpt, max_upload_mb=5)) as url:
        yield url


def test_page_in_headless_chromium(live_server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (the [test] extra)")
    browser_path = chromium()
    if browser_path is None:
        pytest.skip("no Chromium found (apt-get install chromium, or set LARVSEG_CHROMIUM); .ci/run installs it")
    photo = _photo(96, 128, seed=3)
    image_path = tmp_path / "street.png"
    Image.fromarray(photo).save(image_path)
    bad_path = tmp_path / "notes.txt"
    bad_path.write_text("this is not an image")

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        page.goto(live_server)
        page.wait_for_function("document.querySelectorAll('#preset option').length === 6")
        assert "7 classes" in page.inner_text("#model-info")

        # a bad upload: the message is shown, nothing else
        page.set_input_files("#file", str(bad_path))
        page.click("#run")
        page.wait_for_selector("#error", state="visible")
        assert "notes.txt: not an image" in page.inner_text("#error")
        assert not page.is_visible("#result")

        page.set_input_files("#file", str(image_path))
        page.fill("#classes", "sky, road, person")
        assert page.input_value("#preset") == "custom"  # typing switched the vocabulary
        page.click("#run")
        page.wait_for_selector("#result", state="visible", timeout=60_000)
        assert not page.is_visible("#error")
        assert page.eval_on_selector("#progress", "p => p.value") == 1
        assert "done in" in page.inner_text("#status")
        page.wait_for_function(
            "document.getElementById('overlay').complete && document.getElementById('overlay').naturalWidth > 0"
        )
        assert page.eval_on_selector("#overlay", "img => [img.naturalWidth, img.naturalHeight]") == [128, 96]
        legend = page.locator("#legend .chip").all_inner_texts()
        rows = page.locator("#areas tbody tr").all_inner_texts()
        assert legend and set(legend) <= {"sky", "road", "person"} and len(rows) == len(legend)
        percents = [float(r.split("\t")[3].rstrip(" %")) for r in rows]
        assert sum(percents) == pytest.approx(100.0, abs=0.05 * len(rows))
        href = page.get_attribute("#download-labels", "href")
        labels_png = page.request.get(live_server + href).body()
        labels = cv2.imdecode(np.frombuffer(labels_png, np.uint8), cv2.IMREAD_UNCHANGED)
        assert labels.shape == (96, 128) and {NAMES[i] for i in np.unique(labels)} == set(legend)
        shot = tmp_path / "larvseg_serve.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    with Image.open(shot) as im:
        assert im.width >= 1000 and np.asarray(im.convert("L")).std() > 5


def test_cli_serve_starts_uvicorn_with_the_app(ckpt, monkeypatch, capsys):
    uvicorn = pytest.importorskip("uvicorn")
    from larvseg.cli import main as cli_main

    seen = {}

    def fake_run(app, host, port, **kwargs):  # instead of serving forever
        seen.update(host=host, port=port, paths={r.path for r in app.routes})

    monkeypatch.setattr(uvicorn, "run", fake_run)
    assert cli_main(["serve", str(ckpt), "--port", "8765", "--device", "cpu"]) == 0
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8765
    assert {"/", "/api/info", "/api/segment", "/api/jobs/{job_id}"} <= seen["paths"]
    assert "http://127.0.0.1:8765" in capsys.readouterr().out


def test_vocabularies_follow_the_trained_classes(tmp_path):
    """A checkpoint that records its supervised classes: the page offers those, and says so for others."""
    torch.manual_seed(1)
    cfg = Config(
        model=ModelConfig(arch="vit_mini", drop_path=0.0, cac=False), eval=EvalConfig(mode="whole", short_side=0)
    )
    path = tmp_path / "trained.pth"
    save_checkpoint(
        path,
        {
            "model": build_segmenter(cfg.model, len(NAMES)).state_dict(),
            "config": cfg.to_dict(),
            "vocab": NAMES,
            "supervised": [0, 2, 3],
        },
    )  # sky, road, person had masks or tags
    service = _service(path)
    client = TestClient(create_app(service))
    presets = {p["key"]: p for p in client.get("/api/info").json()["presets"]}
    assert presets["model"]["known"] == 3 and "trained on" in presets["model"]["label"]
    assert presets["ade150"]["known"] == 3 and presets["coco171"]["known"] == 3 and presets["ade847"]["total"] == 847
    assert client.get("/api/classes").json() == ["sky", "road", "person"]
    image = _encode(Image.fromarray(_photo(48, 64)))
    status = _wait(client, client.post("/api/segment", params={"preset": "model"}, content=image).json()["job"])
    assert status["result"]["num_scored_classes"] == 3
    assert {c["name"] for c in status["result"]["classes"]} <= {"sky", "road", "person"}
    r = client.post("/api/segment", params={"preset": "custom", "classes": "sky, car"}, content=image)
    status = _wait(client, r.json()["job"])
    assert any(
        "1 of your classes had no training data in this checkpoint" in n and "car" in n for n in status["notices"]
    )
    service.close()


# ----------------------------------------------------------------------------------------------
# A bounded queue, a readable size limit, a page that fits a phone


def test_a_full_queue_answers_503_with_retry_after(ckpt):
    """8 concurrent uploads against a queue of 2 while the model is busy: 2 are taken, 6 get 503 with
    Retry-After (no decoded image is held for them); once the queue drains, uploads are taken again."""
    import httpx

    pytest.importorskip("uvicorn", reason="the [web] extra is not installed")

    service = _service(ckpt, max_queue=2)
    gate = threading.Event()
    segment = service.predictor.segment

    def held_segment(*args, **kwargs):  # the model is busy until the test opens the gate
        gate.wait(30)
        return segment(*args, **kwargs)

    service.predictor.segment = held_segment
    with serving(service) as url:
        try:
            body = _encode(Image.fromarray(_photo()))
            start = threading.Barrier(8)

            def upload(k):
                start.wait()
                return httpx.post(f"{url}/api/segment", params={"name": f"u{k}.png"}, content=body, timeout=30)

            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(upload, range(8)))
            codes = sorted(r.status_code for r in answers)
            assert codes == [202] * 2 + [503] * 6, codes
            for r in answers:
                if r.status_code == 503:
                    assert int(r.headers["retry-after"]) >= 1
                    assert "--max-queue" in r.json()["error"] and "busy" in r.json()["error"]
            assert service.pending() == 2 and len(service.jobs) == 2
            gate.set()
            for r in answers:
                if r.status_code == 202:
                    status = None
                    for _ in range(400):
                        status = httpx.get(f"{url}/api/jobs/{r.json()['job']}").json()
                        if status["state"] in ("done", "error"):
                            break
                        time.sleep(0.05)
                    assert status["state"] == "done", status
            assert httpx.post(f"{url}/api/segment", params={"name": "later.png"}, content=body).status_code == 202
        finally:
            gate.set()  # the held jobs must end for the server to stop


def test_a_decompression_bomb_names_the_limit_and_its_flag(ckpt):
    from larvseg.serve import UploadError, decode_upload

    # a 20000 x 20000 PNG header (Pillow refuses it at open, before any pixel is decoded)
    big = Image.new("1", (20000, 20000))
    data = _encode(big)
    with pytest.raises(UploadError) as info:
        decode_upload(data, "huge.png", 2**30, 25_000_000)
    message = str(info.value)
    assert info.value.status == 413
    assert (
        message == "huge.png: the image is 400 megapixels; the limit is 25 megapixels (larvseg serve --max-megapixels)"
    )


def test_overlay_colours_of_one_image_are_perceptually_distinct():
    from larvseg.data.overlay import Prediction, _srgb_to_oklab, class_areas, colours_by_area, distinct_colours

    seq = _srgb_to_oklab(distinct_colours())
    gaps = np.linalg.norm(seq[:, None] - seq[None], axis=-1)[~np.eye(len(seq), dtype=bool)]
    assert gaps.min() > 0.1  # OKLab: about 0.02 is a just-noticeable difference
    names = [f"c{i}" for i in range(150)]
    label_map = np.repeat(np.arange(150)[None], 4, 0)  # every class present
    colours = colours_by_area(Prediction(label_map, names, class_areas(label_map, names)))
    first = _srgb_to_oklab(colours[:12])
    assert np.linalg.norm(first[:, None] - first[None], axis=-1)[~np.eye(12, dtype=bool)].min() > 0.15


LAYOUT_JS = """() => {
  const width = window.innerWidth;
  const wide = [...document.querySelectorAll('body *')].filter((e) => {
    const r = e.getBoundingClientRect();
    return r.width > 0 && (r.right > width + 0.5 || r.left < -0.5);
  }).map((e) => e.tagName + '#' + e.id + '.' + e.className);
  const box = (id) => { const r = document.getElementById(id).getBoundingClientRect();
                        return [r.left, r.top, r.right, r.bottom]; };
  return {scroll: document.documentElement.scrollWidth, width, wide, form: box('form'),
          result: box('result'), layers: box('layers')};
}"""


@pytest.mark.parametrize("width", [360, 1280])
def test_page_fits_the_window_and_clears_a_failed_upload(live_server, tmp_path, width):
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (the [test] extra)")
    browser_path = chromium()
    if browser_path is None:
        pytest.skip("no Chromium found (apt-get install chromium, or set LARVSEG_CHROMIUM); .ci/run installs it")
    image_path = tmp_path / "a_photo_with_a_rather_long_file_name_from_a_phone_camera_20261206_101010.png"
    Image.fromarray(_photo(300, 400, seed=5)).save(image_path)
    bad_path = tmp_path / "notes.txt"
    bad_path.write_text("this is not an image")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": width, "height": 800})
        page.goto(live_server)
        page.wait_for_function("document.querySelectorAll('#preset option').length === 6")
        assert "--max-upload-mb" in page.inner_text("#limits") and "--max-megapixels" in page.inner_text("#limits")
        page.select_option("#preset", "in21k")
        assert "21,843" in page.inner_text("#preset-info")  # the whole label, which the select may cut
        page.select_option("#preset", "model")
        page.set_input_files("#file", str(image_path))
        page.click("#run")
        page.wait_for_selector("#result", state="visible", timeout=60_000)
        page.wait_for_function(
            "['photo', 'overlay'].every((id) => document.getElementById(id).complete "
            "&& document.getElementById(id).naturalWidth > 0)"
        )
        layout = page.evaluate(LAYOUT_JS)
        assert layout["scroll"] <= width and not layout["wide"], layout  # nothing wider than the window
        assert layout["result"][0] >= 0 and layout["result"][2] <= width and layout["layers"][2] <= width
        if width < 760:  # one column: the result below the form
            assert layout["result"][1] > layout["form"][3]
        else:  # two columns: the result beside the form
            assert layout["result"][0] > layout["form"][2] and layout["result"][1] < layout["form"][3]
        shot = tmp_path / f"result_{width}.png"
        page.screenshot(path=str(shot), full_page=True)
        if os.environ.get("LARVSEG_SCREENSHOTS"):  # to look at them: LARVSEG_SCREENSHOTS=folder
            shutil.copy(shot, os.environ["LARVSEG_SCREENSHOTS"])
        # the opacity slider acts on the colour layer only
        page.fill("#opacity", "80")
        page.dispatch_event("#opacity", "input")
        assert page.eval_on_selector("#overlay", "e => getComputedStyle(e).opacity") == "0.8"

        # a failed upload: the previous result is not left beside the error as if it were this file's
        page.set_input_files("#file", str(bad_path))
        page.click("#run")
        page.wait_for_selector("#error", state="visible")
        assert not page.is_visible("#result")
        assert "No result for notes.txt" in page.inner_text("#placeholder")
        layout = page.evaluate(LAYOUT_JS)
        assert layout["scroll"] <= width and not layout["wide"], layout
        page.screenshot(path=str(tmp_path / f"error_{width}.png"), full_page=True)
        if os.environ.get("LARVSEG_SCREENSHOTS"):
            shutil.copy(tmp_path / f"error_{width}.png", os.environ["LARVSEG_SCREENSHOTS"])
        browser.close()
    with Image.open(shot) as im:
        assert im.width == width and np.asarray(im.convert("L")).std() > 5
