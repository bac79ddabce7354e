"""What values a config key or a command-line option allows: one declaration, checked where it is read.

A :class:`Domain` says in words what is allowed (``"an integer >= 1"``), how to test a value, and a few
values outside it (``wrong``: the field-walking test in tests/test_domains.py tries each of them on
every config key and every option). Config dataclasses list the domain of each field in a ``DOMAINS``
table next to their fields (larvseg.config); ``larvseg.config.load_config`` checks every field once,
when the config is loaded, and a bad value is one line naming the key, the value and what is allowed.
Command-line options use the same domains as their argparse ``type`` (``Domain.option``).

Adding a config field: give it an entry in its class's ``DOMAINS`` (the test fails until it has one).
"""

from __future__ import annotations

import math
import os
import re
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from larvseg.errors import UserError


class DomainError(UserError, ValueError):
    """A value outside what its key or option allows; the message names both."""

    hint = "see the key's comment in larvseg/config.py or the option's --help"


@dataclass(frozen=True)
class Domain:
    """``allowed``: the allowed values in words; ``kind``: the Python type a command-line string is read
    as; ``problem(value)``: None when the value is allowed, else why not (defaults to "expected <allowed>");
    ``wrong``: example values outside the domain (as typed: strings); ``machine``: whether the answer
    depends on this machine (a device), so that configs stored in checkpoints skip it."""

    allowed: str
    kind: type = str
    test: Callable[[Any], bool] = lambda value: True
    wrong: tuple[str, ...] = ()
    machine: bool = False
    explain: Callable[[Any], str | None] | None = None

    def problem(self, value: Any) -> str | None:
        if self.explain is not None:
            return self.explain(value)
        return None if self.test(value) else f"expected {self.allowed}"

    def check(self, value: Any, key: str) -> Any:
        """``value`` if allowed, else DomainError naming ``key``."""
        why = self.problem(value)
        if why is not None:
            raise DomainError(f"{key}={value!r}: {why}")
        return value

    def parse(self, text: str) -> Any:
        """A command-line string as ``kind``, then checked; ValueError with the reason otherwise."""
        if self.kind is str:
            value: Any = text
        else:
            try:
                value = float(text) if self.kind is float else int(text)
            except ValueError:
                raise ValueError(f"expected {self.allowed}, got {text!r}") from None
        why = self.problem(value)
        if why is not None:
            raise ValueError(f"{why}, got {text!r}")
        return value

    def option(self) -> Callable[[str], Any]:
        """An argparse ``type``: a wrong value is argparse's one-line "argument --x: ..." error."""
        import argparse

        def convert(text: str) -> Any:
            try:
                return self.parse(text)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None

        convert.__name__ = self.allowed  # argparse names the type in some messages
        convert.domain = self  # type: ignore[attr-defined]  # the field-walking test reads it
        return convert


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ----------------------------------------------------------------------------------------------
# The domains (module constants, so a table of them reads like the docs)

TEXT = Domain("any text")  # free text: names, paths read later (each reader names a missing file)
BOOL = Domain("true or false", bool, lambda v: isinstance(v, bool))
INTEGER = Domain("an integer", int, _integer)
POSITIVE_INT = Domain("an integer >= 1", int, lambda v: _integer(v) and v >= 1, ("0", "-3"))
NON_NEGATIVE_INT = Domain("an integer >= 0", int, lambda v: _integer(v) and v >= 0, ("-1",))
NUMBER = Domain("a finite number", float, _finite, ("nan", "inf"))
POSITIVE = Domain("a number > 0", float, lambda v: _finite(v) and v > 0, ("0", "-1", "nan", "inf"))
NON_NEGATIVE = Domain("a number >= 0", float, lambda v: _finite(v) and v >= 0, ("-1", "nan", "inf"))
FRACTION = Domain("a number from 0 to 1 (0 excluded)", float, lambda v: _finite(v) and 0 < v <= 1, ("0", "1.5", "nan"))
PROBABILITY_BELOW_1 = Domain("a number >= 0 and < 1", float, lambda v: _finite(v) and 0 <= v < 1, ("1", "-0.1", "nan"))
MULTIPLE_OF_16 = Domain(
    "a positive multiple of 16", int, lambda v: _integer(v) and v > 0 and v % 16 == 0, ("0", "-16", "50")
)
AMP_MODES = ("auto", "bf16", "off")  # auto: bf16 autocast where measured faster on this machine (larvseg.precision)
# the keys of larvseg.data.formats.FORMATS, in its order (tests/test_data_formats.py checks that they agree):
# named here, below the data layer, so that a config is checked when it is loaded and `larvseg --help`
# stays instant; everything else about a format is its FORMATS entry
DATASET_FORMATS = ("ade150", "ade847", "coco171", "imagenet", "custom_seg", "custom_tags", "webdataset")
PORT = Domain("a port from 1 to 65535", int, lambda v: _integer(v) and 1 <= v <= 65535, ("0", "70000", "http"))
SIZE_PATTERN = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*", re.IGNORECASE)  # 512MB, 1GB, 1GiB, 4096
SIZE = Domain(
    "a size such as 512MB, 1GB or 1GiB",
    str,
    lambda v: isinstance(v, str) and SIZE_PATTERN.fullmatch(v) is not None,
    ("big", "-5MB"),
)


HUB_REPO_PATTERN = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")  # a Hugging Face repository id
HUB_REPO_ID = Domain(
    "owner/name of a Hugging Face model repository",
    str,
    lambda v: isinstance(v, str) and HUB_REPO_PATTERN.fullmatch(v) is not None,
    ("noslash", "org/name/extra", "my org/model"),
)


def one_of(*choices: str) -> Domain:
    return Domain("one of " + ", ".join(choices), str, lambda v: v in choices, ("nonsense",))


def pair(item: Domain, ordered: bool = False, what: str = "") -> Domain:
    """A list of two values of ``item`` (``ordered``: the first <= the second)."""

    def test(v: Any) -> bool:
        return (
            isinstance(v, list)
            and len(v) == 2
            and all(item.problem(x) is None for x in v)
            and (not ordered or v[0] <= v[1])
        )

    order = ", the first <= the second" if ordered else ""
    return Domain(
        f"a list of two values, each {item.allowed}{order}{what}", list, test, ("[1]", "[1, 2, 3]", "[-1, 5]")
    )


def device_problem(value: Any) -> str | None:
    """None when ``value`` names a device of this machine (auto, cpu, cuda, cuda:N), else why not."""
    allowed = "auto, cpu, cuda or cuda:N"
    if not isinstance(value, str):
        return f"expected {allowed}"
    kind, _, index = value.partition(":")
    if value in ("auto", "cpu"):
        return None
    if kind != "cuda" or (index and not index.isdigit()):
        return f"expected {allowed}"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device on this machine (torch.cuda.is_available() is False): use cpu or auto"
    if index and int(index) >= torch.cuda.device_count():
        return f"this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}"
    return None


AMP = one_of(*AMP_MODES)

DEVICE = Domain(
    "auto, cpu, cuda or cuda:N (a device of this machine)",
    str,
    wrong=("tpu", "cuda:99", "gpu"),
    machine=True,
    explain=device_problem,
)

CLASS_FILE_SUFFIXES = (".txt", ".csv", ".tsv", ".json", ".names", ".lst")


def classes_problem(value: Any) -> str | None:
    """A ``classes`` value (comma-separated names or a file) that looks like a file name but is no file."""
    if not isinstance(value, str):
        return "expected comma-separated class names or a file of them"
    text = value.strip()
    # a file suffix, or a path whose folder exists or that starts like one ("read/write head" is an
    # ImageNet class name, not a path)
    path = Path(text).expanduser()
    looks_like_path = "," not in text and (
        text.lower().endswith(CLASS_FILE_SUFFIXES)
        or (os.sep in text and (text.startswith(("/", "./", "../", "~")) or path.parent.is_dir()))
    )
    if looks_like_path and not path.is_file():
        return (
            "looks like a file of class names, but there is no such file (give an existing file, "
            "or class names separated by commas)"
        )
    return None


CLASSES = Domain(
    "comma-separated class names or an existing file with one per line",
    str,
    wrong=("no/such/names.txt", "names.txt"),
    explain=classes_problem,
)


def writable_problem(value: Any, is_file: bool = False) -> str | None:
    """Why the output ``value`` (a folder, or a file when ``is_file``) cannot be written, or None.
    Nothing is created: the nearest existing folder above it must be writable."""
    if not isinstance(value, str) or not value.strip():
        return "expected a path"
    path = Path(value).expanduser()
    if path.exists():
        if is_file and path.is_dir():
            return "is a folder; give a file name"
        if not is_file and not path.is_dir():
            return "is a file, not a folder"
        target = path if not is_file else path.parent
        return None if os.access(target, os.W_OK | os.X_OK) else "cannot write there (permission or read-only disk)"
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                return f"cannot be created: {parent} is a file, not a folder"
            if not os.access(parent, os.W_OK | os.X_OK):
                return f"cannot be created: {parent} is not writable (permission or read-only disk)"
            return None
    return None


def require_writable(path: str | os.PathLike, what: str) -> Path:
    """``path`` if the folder can be written (or created), else DomainError naming ``what``: checked
    before the long work of a command, not after it."""
    why = writable_problem(str(path))
    if why is not None:
        raise DomainError(f"{what} {path}: {why}")
    return Path(path)


OUTPUT_DIR = Domain(
    "a folder that exists or can be created, and is writable",
    str,
    wrong=("/proc/version/out", ""),
    explain=writable_problem,
)
OUTPUT_FILE = Domain(
    "a file path in a writable folder",
    str,
    wrong=("/proc/version/model.onnx", "/"),
    explain=lambda v: writable_problem(v, is_file=True),
)
EXISTING_FILE = Domain(
    "an existing file",
    str,
    wrong=("no/such/file.png",),
    explain=lambda v: None if isinstance(v, str) and Path(v).expanduser().is_file() else "no such file",
)


def resume_problem(value: Any) -> str | None:
    if value in ("auto", "none") or (isinstance(value, str) and Path(value).expanduser().is_file()):
        return None
    return "expected auto, none or an existing checkpoint file"


RESUME = Domain("auto, none or a checkpoint file", str, wrong=("no/such/iter_1.pth",), explain=resume_problem)

COMPARE_OPTION_SYNTAX = "[LABEL:] KEY=VALUE [KEY=VALUE ...] (e.g. model.image_loss.pooling=region)"


def split_compare_option(text: str) -> tuple[str, list[str]]:
    """One OPTION of ``larvseg demo --compare`` -> (label, "" when none; its KEY=VALUE overrides); ValueError
    saying what is wrong. A colon is a label's only when no "=" comes before it (else it is in a value)."""
    label, sep, rest = text.partition(":")
    if not sep or "=" in label:
        label, rest = "", text
    overrides = shlex.split(rest)  # ValueError on an unbalanced quote
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if not overrides or bad:
        raise ValueError(
            f"expected {COMPARE_OPTION_SYNTAX}; "
            + (f"not KEY=VALUE: {', '.join(map(repr, bad))}" if bad else "no override")
        )
    return label.strip(), overrides


def compare_option_problem(value: Any) -> str | None:
    try:
        split_compare_option(value)
    except ValueError as exc:
        return str(exc)
    return None


COMPARE_OPTION = Domain(
    COMPARE_OPTION_SYNTAX, str, wrong=("pooling", "label:", "'unbalanced=1"), explain=compare_option_problem
)


def check_fields(
    instance: Any, domains: dict[str, Domain], where: str, here: bool = True, skip: Sequence[str] = ()
) -> None:
    """Check every field of a config dataclass ``instance`` that has a domain (DomainError naming
    ``where.field``); ``here=False`` skips the machine-dependent ones (configs stored in checkpoints)."""
    for name, domain in domains.items():
        if name in skip or (domain.machine and not here):
            continue
        domain.check(getattr(instance, name), f"{where + '.' if where else ''}{name}")
