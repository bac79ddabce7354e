"""The ``larvseg`` command line: one sub-command per workflow, each implemented in its own module.

    larvseg train CONFIG [key=value ...]            training (larvseg.train.loop)
    larvseg eval CONFIG CHECKPOINT [key=value ...]  mIoU evaluation (larvseg.eval.evaluate)
    larvseg predict CHECKPOINT IMAGE ... --out DIR  segment your own images (larvseg.predict)
    larvseg demo [--quick]                          the mini benchmark end to end (larvseg.demo.run)
    larvseg data check CONFIG [key=value ...]       validate datasets against the disk (larvseg.data.check)

Modules are imported only when their command runs, so ``larvseg --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="config file, or the name of a packaged config (see larvseg/configs)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.iters=1000")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="larvseg", description="Large-vocabulary semantic segmentation.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a segmenter (run under torchrun for several processes)")
    _add_config_args(p)
    p.add_argument("--work-dir", default=None, help="output folder (default: train.work_dir or work_dirs/<config>)")
    p.add_argument("--resume", default=None, help="checkpoint to resume from; 'auto' (default) = newest in the work dir, 'none' = start fresh")
    p.set_defaults(handler="larvseg.train.loop:main")

    p = sub.add_parser("eval", help="evaluate a checkpoint (mIoU; run under torchrun for several processes)")
    p.add_argument("config", help="config file or packaged config name")
    p.add_argument("checkpoint", help="checkpoint file (.pth or .safetensors)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. eval.mode=whole")
    p.add_argument("--eval", dest="metrics", nargs="*", default=["mIoU"], help="metrics (mIoU; accepted for the original's scripts)")
    p.add_argument("--out", default=None, help="folder for per-class results (default: next to the checkpoint)")
    p.set_defaults(handler="larvseg.eval.evaluate:main")

    p = sub.add_parser("predict", help="segment images with a trained checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--classes", default=None, help="restrict to these class names: comma-separated, or a file with one name per line")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--amp", default="auto", help="auto | bf16 | off")
    p.add_argument("--short-side", type=int, default=None,
                   help="resize so the short side has this length (0 = keep); default: the checkpoint's eval.short_side, "
                        "so predictions match `larvseg eval`")
    p.set_defaults(handler="larvseg.predict:main")

    p = sub.add_parser("demo", help="generate the mini benchmark, train the three variants, write a report")
    p.add_argument("--quick", action="store_true", help="1-2 minute smoke version")
    p.add_argument("--out", default="work_dirs/demo", help="report and run folder")
    p.add_argument("--data", default=None, help="where the mini benchmark is generated (default: <out>/data)")
    p.add_argument("--seeds", type=int, default=None, help="training seeds per variant (default: 3, quick: 1)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides of the demo config for every variant, e.g. train.iters=800")
    p.set_defaults(handler="larvseg.demo.run:main")

    p = sub.add_parser("data", help="dataset utilities")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    c = data_sub.add_parser("check", help="validate every source of a config against the disk")
    _add_config_args(c)
    c.add_argument("--max-images", type=int, default=0, help="decode at most this many images per source (0 = all)")
    c.set_defaults(handler="larvseg.data.check:main")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module_name, func_name = args.handler.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
