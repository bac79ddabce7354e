"""``amp: auto``'s calibration: what it costs and what it decides here, per architecture and workload.

For each ``--archs`` ViT and each workload (inference: a block's forward; training: forward + backward;
larvseg.models.amp_workload), the calibration ``larvseg train / eval / predict`` run on first use,
timed from a cold cache (a temporary cache folder: the user's ~/.cache/larvseg is not touched), then
read back from the cache. Prints per case: the decision, the measured float32 / bf16 ratio, the
calibration's wall time and the cached lookup's.

    python benchmarks/bench_amp_calibration.py [--archs vit_base,vit_mini] [--device cuda]
"""

from __future__ import annotations

import os
import tempfile
import time

from common import parser, report, setup
from larvseg import precision
from larvseg.models.amp_workload import vit_workload
from larvseg.models.vit import build_vit


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--archs", default="vit_base,vit_mini")
    args = p.parse_args()
    device = setup(args)
    archs = ["vit_tiny"] if args.tiny else args.archs.split(",")
    os.environ.pop(precision.CALIBRATION_ENV, None)  # measure even where the test suite turned it off
    fields: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as cache:
        os.environ["XDG_CACHE_HOME"] = cache
        for arch in archs:
            backbone = build_vit(arch).to(device)
            for kind in ("inference", "training"):
                work = vit_workload(backbone, kind)
                t0 = time.perf_counter()
                choice = precision.choose("auto", device, work)
                cold = time.perf_counter() - t0
                precision._DECIDED.clear()  # as a new process: from the cache file
                t0 = time.perf_counter()
                cached = precision.choose("auto", device, work)
                warm = time.perf_counter() - t0
                entry = precision.cached_entry(device, work)
                assert cached.bf16 == choice.bf16
                tag = f"{arch}_{kind}"
                fields[f"{tag}"] = "bf16" if choice.bf16 else "fp32"
                fields[f"{tag}_speedup"] = float(entry["speedup"])
                fields[f"{tag}_calibration_s"] = cold
                fields[f"{tag}_cached_ms"] = warm * 1e3
    report("amp_calibration", **fields)


if __name__ == "__main__":
    main()
