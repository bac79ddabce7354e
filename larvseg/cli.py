"""The ``larvseg`` command line: one sub-command per workflow, each implemented in its own module.

    larvseg train CONFIG [key=value ...]            training (larvseg.train.loop; evaluation by larvseg.eval.evaluate)
    larvseg pretrain CONFIG [key=value ...]         classification pretraining of the backbone -> AugReg .npz (larvseg.train.pretrain)
    larvseg eval CONFIG CHECKPOINT [key=value ...]  mIoU evaluation (larvseg.eval.evaluate)
    larvseg predict CHECKPOINT IMAGE ... --out DIR  segment your own images (larvseg.predict)
    larvseg serve CHECKPOINT [--port 8000]          a local web page to segment uploads (larvseg.serve)
    larvseg export CHECKPOINT --onnx model.onnx     ONNX model for a fixed vocabulary (larvseg.export)
    larvseg hub save CHECKPOINT DIR | push DIR ORG/NAME   share a model on the Hugging Face Hub (larvseg.hub)
    larvseg demo [--quick|--full] [--benchmark uniform] [--jobs N]   the mini benchmark end to end (larvseg.demo.run)
    larvseg demo ... --compare OPTION [OPTION ...]   image-level loss options vs the paper's (larvseg.demo.compare)
    larvseg data check CONFIG [key=value ...]       validate datasets against the disk (larvseg.data.check)
    larvseg data shard FOLDER --out DIR --format F  write a folder source as tar shards (larvseg.data.shard_writer)

Modules are imported only when their command runs, so ``larvseg --help`` is instant. ``key=value``
overrides may stand anywhere on the line. Errors the user can fix (bad data, config, checkpoint, an
unwritable output, a full disk) print one line naming the file and what to do, and exit with 1; the
traceback only with ``--debug`` or ``LARVSEG_DEBUG=1`` (larvseg.errors). Status lines are logged
(larvseg.log, set up here): the main process (rank 0) shows them, the other ranks only warnings; with
``--debug`` every rank shows everything.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Callable
from typing import Any

from larvseg.domains import (
    AMP,
    CLASSES,
    COMPARE_OPTION,
    DATASET_FORMATS,
    DEVICE,
    EXISTING_FILE,
    HUB_REPO_ID,
    NON_NEGATIVE_INT,
    OUTPUT_DIR,
    OUTPUT_FILE,
    PORT,
    POSITIVE,
    POSITIVE_INT,
    RESUME,
    SIZE,
    TEXT,
    one_of,
)
from larvseg.errors import DEBUG_ENV, DEBUG_NOTE, debug_requested, describe
from larvseg.log import setup_logging

METRIC = one_of("mIoU")
DATASET_FORMAT = one_of(*DATASET_FORMATS)  # `data shard` refuses the formats it cannot write (larvseg.data.formats)


class _Parser(argparse.ArgumentParser):
    """A wrong command line is one line on stderr (what is wrong, where the help is) and exit code 1,
    like every other error a user can fix; argparse's default is the usage block and exit code 2."""

    def error(self, message: str):
        self.exit(1, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def _metric(text: str) -> str:
    """--eval's type: a metric, or an override that landed in its list (moved out by parse_args)."""
    return text if "=" in text else METRIC.option()(text)


_metric.domain = METRIC  # type: ignore[attr-defined]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every argument's default; hides the "(default: None)" of optional values without one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default == [] or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action) or ""


EXPORT_DESCRIPTION = (
    "Export a checkpoint for a fixed vocabulary to ONNX, checked with onnxruntime. The model is a trace of "
    "larvseg.models.inference.whole_image_segmentation, the whole-mode segmentation that predict, eval and serve "
    "share (segment_image). "
    "It differs from larvseg predict in exactly these ways: (1) no resizing: predict resizes the image to "
    "eval.short_side first and the logits back to the image's size; the model segments the image as given "
    "(32 to 8192 px a side), so resize it yourself; (2) whole image only: no sliding windows, whatever the "
    "checkpoint's eval.mode; (3) float32 only: predict's --amp auto may run the backbone in bf16; (4) the argmax "
    "takes all N classes at once (N x H x W floats of memory; predict bounds it, with the same labels); (5) labels "
    "are positions in the exported class list, not the model's class ids. So with --short-side 0 --amp off and a "
    "checkpoint whose eval.mode is whole, larvseg predict gives the labels the model gives in PyTorch "
    "(onnxruntime's arithmetic may differ in the last bits: the export's check measures it)."
)


def _sub(sub: Any, name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=description or help, formatter_class=_HelpFormatter)
    p.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help=f"show the full traceback of an error (or set {DEBUG_ENV}=1) (default: off)",
    )
    return p


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="config file, or the name of a packaged config (see larvseg/configs)")
    _add_overrides(p, "config overrides, e.g. train.iters=1000; allowed anywhere on the line")


def _add_overrides(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("overrides", nargs="*", default=[], metavar="key=value", help=help)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="larvseg", description="Large-vocabulary semantic segmentation.", formatter_class=_HelpFormatter
    )
    parser.add_argument(
        "--debug", action="store_true", help=f"show the full traceback of an error (or set {DEBUG_ENV}=1)"
    )
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="COMMAND",
        help="one of the commands below; larvseg COMMAND --help describes its arguments",
    )

    p = _sub(sub, "train", "train a segmenter (run under torchrun for several processes)")
    _add_config_args(p)
    p.add_argument(
        "--work-dir",
        type=OUTPUT_DIR.option(),
        default=None,
        help="output folder (default: train.work_dir or work_dirs/<config>)",
    )
    p.add_argument(
        "--resume",
        type=RESUME.option(),
        default=None,
        help="checkpoint to resume from; 'auto' = newest readable one in the work dir, 'none' = start "
        "fresh (default: train.resume, whose default is auto)",
    )
    p.set_defaults(handler="larvseg.cli:train_command")

    p = _sub(sub, "pretrain", "pretrain the backbone by image classification on the tag sources; writes an AugReg .npz")
    _add_config_args(p)
    p.add_argument(
        "--work-dir",
        type=OUTPUT_DIR.option(),
        default=None,
        help="output folder (default: pretrain.work_dir or work_dirs/<config>_pretrain)",
    )
    p.add_argument(
        "--resume",
        type=RESUME.option(),
        default=None,
        help="checkpoint to resume from; 'auto' (default) = newest in the work dir, 'none' = start fresh",
    )
    p.set_defaults(handler="larvseg.train.pretrain:main")

    p = _sub(sub, "eval", "evaluate a checkpoint (mIoU; run under torchrun for several processes)")
    p.add_argument("config", help="config file or packaged config name: its data.eval is the evaluation set")
    p.add_argument("checkpoint", help="checkpoint file (.pth, or .safetensors with its .json)")
    _add_overrides(p, "config overrides, e.g. eval.mode=whole; allowed anywhere on the line")
    p.add_argument(
        "--eval",
        dest="metrics",
        nargs="*",
        type=_metric,
        default=["mIoU"],
        help="metrics to compute (mIoU, which brings mAcc and aAcc; accepted for the original's scripts)",
    )
    p.add_argument(
        "--classes",
        type=CLASSES.option(),
        default=None,
        help="predict and score only these classes: comma-separated names or a file with one per line; "
        "WordNet lemmas and wnids work, 'animal*' = every evaluation class at or below the synset "
        "(default: eval.classes, whose default '' = every class of the evaluation set)",
    )
    p.add_argument(
        "--out",
        type=OUTPUT_DIR.option(),
        default=None,
        help="folder for per-class results (default: eval_<checkpoint> next to the checkpoint)",
    )
    p.set_defaults(handler="larvseg.eval.evaluate:main")

    p = _sub(sub, "predict", "segment images with a trained checkpoint")
    p.add_argument(
        "checkpoint",
        help="checkpoint file (.pth, or .safetensors with its .json next to it), a folder "
        "written by `larvseg hub save`, or hf-hub:<owner>/<name>",
    )
    p.add_argument("images", nargs="+", help="image files or folders (every image file in a folder, not recursive)")
    p.add_argument(
        "--classes",
        type=CLASSES.option(),
        default=None,
        help="restrict to these classes: comma-separated, or a file with one per line. Class names, any "
        "WordNet lemma (automobile) or wnid (n02958343); 'dog*' = the synset and every class below "
        "it, reported as one class 'dog' (default: the classes that had training data, masks or tags)",
    )
    p.add_argument("--out", type=OUTPUT_DIR.option(), required=True, help="output folder (required)")
    p.add_argument(
        "--device", type=DEVICE.option(), default="auto", help="auto (cuda if available) | cpu | cuda | cuda:N"
    )
    p.add_argument(
        "--amp",
        type=AMP.option(),
        default="auto",
        help="auto (bf16 where measured faster on this machine, cached) | bf16 | off",
    )
    p.add_argument(
        "--short-side",
        type=NON_NEGATIVE_INT.option(),
        default=None,
        help="resize so the short side has this length (0 = keep); default: the checkpoint's eval.short_side, "
        "so predictions match `larvseg eval`",
    )
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="also write, per concept of --classes (dog*), the area of each of its classes to areas.json",
    )
    p.set_defaults(handler="larvseg.predict:main")

    p = _sub(sub, "serve", "a local web page: upload an image, pick a vocabulary, see the segmentation")
    p.add_argument("checkpoint", help="checkpoint file (.pth, or .safetensors with its .json next to it)")
    p.add_argument(
        "--host",
        type=TEXT.option(),
        default="127.0.0.1",
        help="address to listen on (0.0.0.0 = reachable from other machines)",
    )
    p.add_argument("--port", type=PORT.option(), default=8000, help="port to listen on (1-65535)")
    p.add_argument(
        "--device", type=DEVICE.option(), default="auto", help="auto (cuda if available) | cpu | cuda | cuda:N"
    )
    p.add_argument("--max-upload-mb", type=POSITIVE.option(), default=20.0, help="largest accepted upload")
    p.add_argument("--max-megapixels", type=POSITIVE.option(), default=25.0, help="largest accepted image")
    p.add_argument(
        "--max-queue",
        type=POSITIVE_INT.option(),
        default=4,
        help="uploads waiting or running at once; more are answered 503 with Retry-After",
    )
    p.set_defaults(handler="larvseg.serve:main")

    p = _sub(
        sub,
        "export",
        "export a checkpoint for a fixed vocabulary to ONNX, checked with onnxruntime",
        description=EXPORT_DESCRIPTION,
    )
    p.add_argument("checkpoint", help="checkpoint file (.pth, or .safetensors with its .json next to it)")
    p.add_argument("--onnx", type=OUTPUT_FILE.option(), required=True, help="output .onnx file (required)")
    p.add_argument(
        "--classes",
        type=CLASSES.option(),
        default=None,
        help="the fixed vocabulary: comma-separated names or a file with one per line "
        "(default: the classes that had training data, as larvseg predict)",
    )
    p.add_argument(
        "--check-images",
        type=EXISTING_FILE.option(),
        nargs="*",
        default=None,
        metavar="IMAGE",
        help="images for the onnxruntime-vs-PyTorch check (default: two synthetic ones)",
    )
    p.add_argument(
        "--tolerance", type=POSITIVE.option(), default=1e-3, help="largest accepted max abs logit difference"
    )
    p.set_defaults(handler="larvseg.export:main")

    p = _sub(sub, "hub", "share a trained model: save it as a Hugging Face model repository, push it to the Hub")
    hub_sub = p.add_subparsers(
        dest="hub_command",
        required=True,
        metavar="HUB_COMMAND",
        help="save: write the repository folder; push: upload it (huggingface_hub)",
    )
    h = _sub(
        hub_sub,
        "save",
        "write a checkpoint as a Hugging Face model repository folder (weights, config, classes, model card)",
    )
    h.add_argument("checkpoint", help="checkpoint file (.pth, or .safetensors with its .json next to it)")
    h.add_argument("out_dir", type=OUTPUT_DIR.option(), help="output folder")
    h.add_argument(
        "--eval-results",
        type=EXISTING_FILE.option(),
        default=None,
        help="eval_results.json for the card's metrics (default: eval_<checkpoint>/ or eval_iter_<step>/ "
        "next to the checkpoint, when there)",
    )
    h.add_argument(
        "--title", type=TEXT.option(), default=None, help="the model card's title (default: the folder's name)"
    )
    h.add_argument(
        "--repo-id",
        type=HUB_REPO_ID.option(),
        default=None,
        help="owner/name used in the card's usage snippet (default: ORG/<folder>)",
    )
    h.set_defaults(handler="larvseg.hub:main_save")
    h = _sub(hub_sub, "push", "upload a folder written by `larvseg hub save` to the Hugging Face Hub")
    h.add_argument("folder", help="the folder written by larvseg hub save")
    h.add_argument(
        "repo_id", type=HUB_REPO_ID.option(), help="owner/name of the model repository (created if it does not exist)"
    )
    h.add_argument("--private", action="store_true", help="create the repository as private")
    h.add_argument("--revision", type=TEXT.option(), default=None, help="branch to upload to (default: main)")
    h.set_defaults(handler="larvseg.hub:main_push")

    p = _sub(sub, "demo", "generate the mini benchmark, train the variants, check the paper's claim, write a report")
    profile = p.add_mutually_exclusive_group()
    profile.add_argument(
        "--quick",
        action="store_true",
        help="smoke version: one seed, fewer iterations, every check (including the oracle run U)",
    )
    profile.add_argument(
        "--full",
        action="store_true",
        help="the default profile plus the oracle-attention upper bound U and segmentation only on every seed",
    )
    p.add_argument(
        "--benchmark",
        type=one_of("habitat", "uniform").option(),
        default="habitat",
        help="benchmark family: habitat (default: context-biased, cluttered image-level photos) or uniform "
        "(the control: backgrounds drawn uniformly)",
    )
    p.add_argument("--out", type=OUTPUT_DIR.option(), default="work_dirs/demo", help="report and run folder")
    p.add_argument(
        "--data",
        type=OUTPUT_DIR.option(),
        default=None,
        help="where the mini benchmark is generated (default: <out>/data)",
    )
    p.add_argument(
        "--seeds",
        type=POSITIVE_INT.option(),
        default=None,
        help="paired seeds of the baseline and LarvSeg (default: 5, quick: 1; segmentation only: 3 of them)",
    )
    p.add_argument(
        "--jobs",
        type=POSITIVE_INT.option(),
        default=None,
        help="runs trained in parallel, one single-threaded process each (default: the usable CPUs)",
    )
    p.add_argument(
        "--compare",
        nargs="+",
        action="extend",
        default=None,
        metavar="OPTION",
        type=COMPARE_OPTION.option(),
        help="instead of the claim check (the default, without --compare): train the paper's image-level loss and each OPTION (baseline and "
        "LarvSeg, paired seeds, plus segmentation only) and write <out>/compare.md and compare.json "
        "(larvseg.demo.compare). OPTION is one argument: '[LABEL:] KEY=VALUE [KEY=VALUE ...]', e.g. "
        "model.image_loss.pooling=region or 'region+conf: model.image_loss.pooling=region "
        "model.image_loss.confident_base=0.5'. Finished runs of the identical config are reused. Put "
        "demo overrides before --compare (after it, every KEY=VALUE is an OPTION)",
    )
    _add_overrides(p, "overrides of the demo config for stage 0 and every variant, e.g. train.iters=800")
    p.set_defaults(handler="larvseg.demo.compare:main")  # larvseg.demo.run:main unless --compare

    p = _sub(sub, "data", "dataset utilities")
    data_sub = p.add_subparsers(
        dest="data_command",
        required=True,
        metavar="DATA_COMMAND",
        help="check: validate a config's datasets against the disk; shard: write a folder source as tar shards",
    )
    c = _sub(data_sub, "check", "validate every source of a config against the disk")
    _add_config_args(c)
    c.add_argument(
        "--max-images",
        type=NON_NEGATIVE_INT.option(),
        default=0,
        help="decode at most this many images per source (0 = all)",
    )
    c.set_defaults(handler="larvseg.data.check:main")
    s = _sub(data_sub, "shard", "write a folder source as WebDataset tar shards (resumable: run it again)")
    s.add_argument("source", help="the source's folder (for --format imagenet: the folder holding fall11_whole)")
    s.add_argument(
        "--out",
        type=OUTPUT_DIR.option(),
        required=True,
        help="output folder for shard-*.tar, shard-*.npz and index.json (required)",
    )
    s.add_argument(
        "--format",
        type=DATASET_FORMAT.option(),
        required=True,
        help="the folder's layout, as in configs; every folder format, not shards (required)",
    )
    s.add_argument(
        "--split",
        type=TEXT.option(),
        default="",
        help="split sub-folder of segmentation formats (default: detected, the training split in either "
        "spelling, e.g. train2017 or training)",
    )
    s.add_argument(
        "--classes",
        type=CLASSES.option(),
        default=None,
        help="imagenet (required): ade150 | ade847 | all | wnid file; custom formats: class file "
        "(default: custom_seg <folder>/classes.txt, custom_tags every class folder)",
    )
    s.add_argument(
        "--name", type=TEXT.option(), default=None, help="source name stored in the index (default: the format's)"
    )
    s.add_argument("--shard-size", type=SIZE.option(), default="1GB", help="maximum bytes per shard, e.g. 512MB, 1GB")
    s.add_argument(
        "--shard-samples", type=NON_NEGATIVE_INT.option(), default=0, help="maximum samples per shard (0 = no limit)"
    )
    s.add_argument("--seed", type=NON_NEGATIVE_INT.option(), default=0, help="seed of the random sample order")
    s.add_argument(
        "--no-shuffle", action="store_true", help="keep the folder order (shards then hold few classes each)"
    )
    s.add_argument(
        "--skip-bad", action="store_true", help="leave out (and list in index.json) samples with bad annotations"
    )
    s.add_argument(
        "--index-cache-dir",
        type=OUTPUT_DIR.option(),
        default=None,
        help="where the ImageNet file list is cached (default: ~/.cache/larvseg)",
    )
    s.set_defaults(handler="larvseg.data.shard_writer:main")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Like ``parser.parse_args``, but ``key=value`` overrides may stand anywhere on the line: after an
    option (``--resume none train.iters=3``) or after ``--eval mIoU`` (the order of the original's
    dist_test.sh)."""
    args, extra = parser.parse_known_args(argv)
    metrics = getattr(args, "metrics", None)
    if metrics is not None:  # --eval takes a list: overrides after it land there
        extra = [m for m in metrics if "=" in m] + extra
        args.metrics = [m for m in metrics if "=" not in m]
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides or []) + extra
    return args


def _one_line_warnings(command: str) -> Callable[..., None]:
    """``warnings.showwarning`` for a command: one line with the message, not the source line that warned."""

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file=None, line=None) -> None:
        print(f"larvseg {command}: warning: {' '.join(str(message).split())}", file=sys.stderr, flush=True)

    return show


def train_command(args: argparse.Namespace) -> int:
    """``larvseg train``: the training loop (larvseg.train.loop.main) with ``larvseg eval``'s Evaluator handed
    in from here, the layer above both, so that training and evaluation never import each other."""
    from larvseg.eval.evaluate import Evaluator
    from larvseg.train import loop

    return loop.main(args, make_evaluator=Evaluator)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parse_args(parser, argv)
    except SystemExit as exc:  # --help (0), or a wrong command line: its one line is printed already (1)
        return exc.code if isinstance(exc.code, int) else 1
    debug = debug_requested(getattr(args, "debug", False))
    setup_logging(debug)
    module_name, func_name = args.handler.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    if debug:
        return int(func(args) or 0)
    with warnings.catch_warnings():  # restored on return: in-process callers (tests) keep their own
        warnings.showwarning = _one_line_warnings(args.command)
        try:
            return int(func(args) or 0)
        except Exception as exc:  # only user-facing errors are caught; describe() returns None for bugs
            line = describe(exc)
            if line is None:
                raise
            print(f"larvseg {args.command}: error: {line} [{DEBUG_NOTE}]", file=sys.stderr, flush=True)
            return 1


if __name__ == "__main__":
    sys.exit(main())
