"""Peak memory of `larvseg serve` under 8 concurrent uploads of a 24.5-megapixel photo, with the job queue
capped (``--max-queue``) and effectively uncapped, side by side (each in a fresh process; ru_maxrss).

Each setting: a random ViT-Mini checkpoint with the packaged eval settings (short side 512, slide mode),
8 threads submit the same 5712x4288 PNG at once to ``SegmentationService.submit`` (what the HTTP
endpoint calls, after its own capacity check), the uploads the queue takes are segmented, and the
process reports how many were taken, how many got 503, and its peak RSS. What the cap bounds is the
number of decoded images held while they wait (73.5 MB each at 24.5 MP, uint8 RGB) and the per-job
buffers while they run.

    python benchmarks/bench_serve_queue.py [--queues 2 100] [--tiny]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import interesting_cpu_flags, machine, parser, report

CHILD = r"""
import io, json, resource, sys, tempfile, threading, time
from pathlib import Path
import cv2, numpy as np, torch
from PIL import Image
from larvseg.config import Config, ModelConfig
from larvseg.models.segmenter import build_segmenter
from larvseg.predict import LarvSegPredictor
from larvseg.serve import SegmentationService, UploadError
from larvseg.train.checkpoint import save_checkpoint

queue, png = int(sys.argv[1]), Path(sys.argv[2]).read_bytes()
torch.set_num_threads(1)
torch.manual_seed(0)
cfg = Config(model=ModelConfig(arch="vit_mini", drop_path=0.0, cac=False))
names = [f"class {i}" for i in range(20)]
path = Path(tempfile.mkdtemp()) / "m.pth"
save_checkpoint(path, {"model": build_segmenter(cfg.model, len(names)).state_dict(), "config": cfg.to_dict(), "vocab": names})
service = SegmentationService(LarvSegPredictor.from_checkpoint(path, device="cpu"), str(path), max_upload_mb=100,
                              max_megapixels=30, max_queue=queue)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
barrier, taken, refused = threading.Barrier(8), [], []

def upload(k):
    barrier.wait()
    try:
        taken.append(service.submit(png, f"u{k}.png", "model", ""))
    except UploadError as exc:
        refused.append(exc.status)

t0 = time.perf_counter()
threads = [threading.Thread(target=upload, args=(k,)) for k in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
while any(j.state in ("queued", "running") for j in taken):
    time.sleep(0.1)
print(json.dumps({"max_queue": queue, "taken": len(taken), "refused_503": len(refused),
                  "done": sum(j.state == "done" for j in taken), "seconds": round(time.perf_counter() - t0, 1),
                  "rss_before_mb": round(base), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10)}))
service.close()
"""


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument(
        "--queues",
        type=int,
        nargs=2,
        default=[2, 100],
        metavar=("CAPPED", "UNCAPPED"),
        help="--max-queue of the two runs",
    )
    args = p.parse_args()
    import cv2
    import numpy as np
    from PIL import Image

    h, w = (300, 400) if args.tiny else (4288, 5712)
    rng = np.random.default_rng(0)
    photo = cv2.resize(rng.integers(0, 256, (43, 57, 3), dtype=np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)
    print(f"# {machine()}; cpu flags: {' '.join(interesting_cpu_flags()) or 'unknown'}", flush=True)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "photo.png"
        Image.fromarray(photo).save(png, compress_level=1)
        print(f"# upload: {png.stat().st_size / 2**20:.1f} MB PNG, {w}x{h} = {w * h / 1e6:.1f} MP, 8 at once")
        for q in args.queues:
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(q), str(png)], capture_output=True, text=True, check=True
            )
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print("#", json.dumps(runs[-1]), flush=True)
    capped, uncapped = runs
    report(
        "serve_queue",
        megapixels=round(w * h / 1e6, 1),
        capped_queue=capped["max_queue"],
        capped_taken=capped["taken"],
        capped_503=capped["refused_503"],
        capped_peak_rss_mb=capped["peak_rss_mb"],
        uncapped_taken=uncapped["taken"],
        uncapped_peak_rss_mb=uncapped["peak_rss_mb"],
        wall_ratio=uncapped["seconds"] / max(capped["seconds"], 1e-9),
    )


if __name__ == "__main__":
    main()
