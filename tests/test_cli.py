"""The ``larvseg`` command line: overrides anywhere, --help texts, one-line user-facing errors."""

from __future__ import annotations

import argparse
import errno

import pytest

from cli_parsers import all_parsers
from larvseg import atomic
from larvseg.cli import build_parser, main, parse_args
from larvseg.config import ConfigError


def _parse(argv):
    return parse_args(build_parser(), argv)


def test_overrides_anywhere_on_the_line():
    args = _parse(["train", "tiny_cpu", "--resume", "none", "train.iters=3"])
    assert (args.config, args.resume, args.overrides) == ("tiny_cpu", "none", ["train.iters=3"])
    args = _parse(["train", "tiny_cpu", "a.b=1", "--work-dir", "w", "c.d=2", "--resume", "auto", "e=3"])
    assert args.overrides == ["a.b=1", "c.d=2", "e=3"] and args.work_dir == "w"
    # the order of tools/dist_test.sh's own usage line: overrides after --eval mIoU
    args = _parse(["eval", "cfg", "ck.pth", "--eval", "mIoU", "data.root=/d", "eval.mode=whole"])
    assert args.metrics == ["mIoU"] and args.overrides == ["data.root=/d", "eval.mode=whole"]
    for bad in (
        ["train", "tiny_cpu", "--nope"],
        ["train", "tiny_cpu", "--resume", "none", "stray"],
        ["predict", "ck.pth", "a.jpg", "--out", "o", "x=1"],
    ):  # predict takes no overrides
        with pytest.raises(SystemExit):
            _parse(bad)


def test_every_help_describes_every_argument_and_shows_defaults():
    parsers = list(all_parsers(build_parser()))
    assert {p for p, _ in parsers} >= {
        "larvseg train",
        "larvseg eval",
        "larvseg predict",
        "larvseg demo",
        "larvseg data check",
    }
    for prog, parser in parsers:
        text = parser.format_help()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and len(action.help) > 8, f"{prog}: {action.dest} has no description"
            if action.option_strings and action.default not in (None, argparse.SUPPRESS):
                assert f"(default: {action.default})" in " ".join(text.split()), f"{prog}: {action.dest}"
            elif action.option_strings and not action.required:  # no fixed default: the help says what happens
                assert "default" in action.help, f"{prog}: {action.dest}"


def _one_line_error(capsys, argv, *must_contain):
    assert main(argv) == 1
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip() and "%|" not in line]  # not progress bars
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    for text in must_contain:
        assert text in lines[0], lines[0]
    return lines[0]


def test_user_errors_are_one_line_and_debug_shows_the_traceback(capsys, monkeypatch):
    monkeypatch.delenv("LARVSEG_DEBUG", raising=False)
    line = _one_line_error(
        capsys, ["train", "tiny_cpu", "train.lr=fast"], "larvseg train: error:", "train.lr", "--debug"
    )
    assert "fix the config" in line
    with pytest.raises(ConfigError):
        main(["train", "tiny_cpu", "train.lr=fast", "--debug"])
    with pytest.raises(ConfigError):
        main(["--debug", "train", "tiny_cpu", "train.lr=fast"])
    monkeypatch.setenv("LARVSEG_DEBUG", "1")
    with pytest.raises(ConfigError):
        main(["train", "tiny_cpu", "train.lr=fast"])


def test_os_errors_name_the_file_and_what_to_do(capsys, monkeypatch, tmp_path):
    from larvseg.errors import describe

    # a read-only output folder (the tests may run as root, where permission bits do not stop writes)
    def denied(tmp):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp))

    monkeypatch.setattr(atomic, "_open_temp", denied)
    with pytest.raises(PermissionError) as info:
        atomic.write_text(tmp_path / "out" / "classes.json", "[]")
    line = describe(info.value)
    assert "classes.json" in line and "Permission denied" in line and "writable" in line.replace("write to", "writable")
    # a full disk: /dev/full gives the kernel's ENOSPC
    monkeypatch.setattr(atomic, "_open_temp", lambda tmp: open("/dev/full", "wb"))
    with pytest.raises(OSError) as info:
        atomic.write_text(tmp_path / "areas.json", "{}" * 10000)
    line = describe(info.value)
    assert "areas.json: could not be written" in line and "disk is full" in line
    assert not (tmp_path / "areas.json").exists()


def test_an_error_from_a_dataloader_worker_is_still_one_line():
    from torch._utils import ExceptionWrapper

    from larvseg.data.io import CorruptImageError
    from larvseg.errors import describe

    try:
        raise CorruptImageError("/data/A847/images/validation/x.jpg", "cannot decode image (truncated)")
    except CorruptImageError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(CorruptImageError) as info:
        wrapped.reraise()  # what a DataLoader with workers raises: the message holds the worker's traceback
    assert describe(info.value).startswith("/data/A847/images/validation/x.jpg: cannot decode image (truncated) (fix")
