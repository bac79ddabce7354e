"""Every config key and every command-line option declares what it allows (larvseg.domains); a wrong
value of any kind is one line on stderr and exit code 1, never a traceback. Walked over every field of
every config dataclass and every option of every sub-command, not a hand-picked list."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

from cli_parsers import all_parsers
from larvseg import cli
from larvseg.config import VIT_ARCHES, Config, SourceConfig, load_config
from larvseg.domains import DATASET_FORMATS, TEXT, Domain

# type-wrong values of each kind (as typed after key=), besides each domain's own out-of-range examples
WRONG_BY_TYPE = {
    int: ["abc", "1.5", "[1]", "{a: 1}", "true"],
    float: ["abc", "[1]", "{a: 1}", "true"],
    bool: ["maybe", "2", "[true]"],
    str: ["[1, 2]", "{a: 1}"],
    list: ["5", "abc", "{a: 1}"],
}
# config leaves under list items are walked at these paths (tiny_cpu has one source in each list)
LIST_ITEMS = {"seg_sources": "0", "tag_sources": "0"}


def config_leaves(cls: type = Config, prefix: str = ""):
    """(dotted key, owning dataclass, field) of every leaf field, list items and nested sections included."""
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from config_leaves(type(default), key + ".")
            continue
        yield key, cls, f
        if f.name in LIST_ITEMS:
            yield from config_leaves(SourceConfig, f"{key}.{LIST_ITEMS[f.name]}.")


def _dataclasses(cls: type = Config):
    yield cls
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from _dataclasses(type(default))
    if cls is Config:
        yield SourceConfig


def test_every_config_field_declares_its_domain():
    for cls in set(_dataclasses()):
        fields = {f.name for f in dataclasses.fields(cls)}
        sections = {
            f.name
            for f in dataclasses.fields(cls)
            if dataclasses.is_dataclass(f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        }
        declared = set(getattr(cls, "DOMAINS", {}))
        missing = fields - sections - declared
        assert not missing, (
            f"{cls.__name__}: give {sorted(missing)} a domain in {cls.__name__}.DOMAINS (larvseg.domains)"
        )
        assert declared <= fields, f"{cls.__name__}.DOMAINS names fields that do not exist: {sorted(declared - fields)}"


def test_packaged_names_match_the_builders():
    from larvseg.data.formats import FORMATS
    from larvseg.models.vit import VIT_BUILDERS

    assert set(VIT_ARCHES) == set(VIT_BUILDERS) and tuple(FORMATS) == DATASET_FORMATS


def _wrong_values(domain: Domain, kind: type) -> list[str]:
    return list(dict.fromkeys(WRONG_BY_TYPE[kind] + list(domain.wrong)))


def _config_cases():
    for key, cls, f in config_leaves():
        domain = cls.DOMAINS[f.name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kind = list if isinstance(default, list) else type(default)
        for value in _wrong_values(domain, kind):
            yield key, value


def _run(capsys, argv: list[str]) -> tuple[int, list[str], str]:
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's error(): one line, exit 1 (cli._Parser)
        code = exc.code
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()], err


@pytest.fixture
def no_training(monkeypatch):
    """If a wrong value were accepted, the command must not go on to train: fail loudly instead."""
    import larvseg.train.loop as loop

    def refuse(*args, **kwargs):
        raise AssertionError("the wrong value was accepted")

    monkeypatch.setattr(loop.main, "__defaults__", (refuse,))  # main(args, build=build)
    monkeypatch.delenv("LARVSEG_DEBUG", raising=False)


def test_every_config_field_rejects_wrong_values_in_one_line(capsys, no_training):
    cases = list(_config_cases())
    keys = {key for key, _ in cases}
    assert (
        len(keys) == sum(1 for _ in config_leaves())
        and "data.tag_sources.0.cac_topk" in keys
        and "train.device" in keys
    )
    for key, value in cases:
        code, lines, err = _run(capsys, ["train", "tiny_cpu", f"{key}={value}"])
        assert code == 1, (key, value, err)
        assert len(lines) == 1 and "Traceback" not in err, (key, value, err)
        assert key in lines[0] and lines[0].startswith("larvseg train: error:"), (key, value, lines[0])


# a valid command line per sub-command, to which one wrong option is added
BASE_ARGV = {
    "larvseg train": ["train", "tiny_cpu"],
    "larvseg pretrain": ["pretrain", "tiny_cpu"],
    "larvseg eval": ["eval", "tiny_cpu", "x.pth"],
    "larvseg predict": ["predict", "x.pth", "a.jpg", "--out", "{tmp}/out"],
    "larvseg serve": ["serve", "x.pth"],
    "larvseg export": ["export", "x.pth", "--onnx", "{tmp}/m.onnx"],
    "larvseg hub save": ["hub", "save", "x.pth", "{tmp}/repo"],
    "larvseg hub push": ["hub", "push", "{tmp}/repo", "org/name"],
    "larvseg demo": ["demo"],
    "larvseg data check": ["data", "check", "tiny_cpu"],
    "larvseg data shard": ["data", "shard", "src", "--out", "{tmp}/shards", "--format", "imagenet"],
}


def _valued_options():
    """(command, option string, domain, kind) of every option that takes a value, of every sub-command."""
    for prog, parser in all_parsers(cli.build_parser()):
        for action in parser._actions:
            if not action.option_strings or action.nargs == 0 or isinstance(action, argparse._HelpAction):
                continue
            domain = getattr(action.type, "domain", None)
            assert isinstance(domain, Domain), f"{prog} {action.option_strings[0]}: give it a larvseg.domains type"
            yield prog, action.option_strings[0], domain


def test_every_option_rejects_wrong_values_in_one_line(capsys, no_training, tmp_path):
    options = list(_valued_options())
    commands = {prog for prog, *_ in options}
    assert commands == set(BASE_ARGV), commands
    tried = 0
    for prog, option, domain in options:
        if domain is TEXT:
            continue  # free text (names, addresses): nothing is wrong at parse time
        assert domain.wrong or domain.kind in (int, float), f"{prog} {option}: its domain has no wrong examples"
        wrong = list(domain.wrong) + (["abc", "1.5"] if domain.kind is int else ["abc"] if domain.kind is float else [])
        for value in dict.fromkeys(wrong):
            argv = [a.format(tmp=tmp_path) for a in BASE_ARGV[prog]] + [option, value]
            code, lines, err = _run(capsys, argv)
            assert code == 1, (argv, err)
            assert len(lines) == 1 and "Traceback" not in err, (argv, err)
            assert f"argument {option}" in lines[0] and lines[0].startswith(f"{prog}: error:"), (argv, lines[0])
            tried += 1
    assert tried > 60


@pytest.mark.parametrize(
    "override",
    [
        "train.lr=-1",
        "model.arch=vit_hugee",
        "eval.stride=0",
        "eval.crop_size=-5",
        "train.iters=-3",
        "data.seg_batch_size=0",
        "train.device=tpu",
    ],
)
def test_the_reported_config_values_fail_at_load(override, capsys, no_training):
    code, lines, err = _run(capsys, ["train", "tiny_cpu", override])
    assert code == 1 and len(lines) == 1 and override.split("=")[0] in lines[0], err


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "x.pth", "--port", "70000"],
        ["predict", "x.pth", "a.jpg", "--out", "o", "--device", "tpu"],
        ["predict", "x.pth", "a.jpg", "--out", "o", "--amp", "fp8"],
        ["predict", "x.pth", "a.jpg", "--out", "o", "--short-side", "-5"],
    ],
)
def test_the_reported_options_fail_at_parse(argv, capsys):
    code, lines, err = _run(capsys, argv)
    assert code == 1 and len(lines) == 1 and f"argument {argv[-2]}" in lines[0], err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: cuda is a valid device here")
def test_cuda_without_a_gpu_is_one_line(capsys, no_training):
    code, lines, err = _run(capsys, ["train", "tiny_cpu", "train.device=cuda"])
    assert code == 1 and len(lines) == 1 and "no CUDA device" in lines[0], err
    code, lines, err = _run(capsys, ["predict", "x.pth", "a.jpg", "--out", "o", "--device", "cuda"])
    assert code == 1 and len(lines) == 1 and "no CUDA device" in lines[0], err


def test_configs_stored_in_checkpoints_skip_machine_domains():
    """A checkpoint trained with train.device=cuda must still load for predict on a CPU machine."""
    from larvseg.config import config_from_dict

    tree = load_config("tiny_cpu").to_dict()
    tree["train"]["device"] = "cuda:7"
    assert config_from_dict(tree).train.device == "cuda:7"


def test_classes_that_look_like_a_missing_file_are_an_error(tmp_path):
    from larvseg.data.class_query import resolve_classes
    from larvseg.data.vocabulary import UnknownClassError
    from larvseg.domains import CLASSES

    assert CLASSES.problem("sky, tree") is None and CLASSES.problem("sky") is None
    assert "no such file" in CLASSES.problem("names.txt") and "no such file" in CLASSES.problem("./lists/mine")
    assert "no such file" in CLASSES.problem(str(tmp_path / "missing"))  # its folder exists
    assert CLASSES.problem("read/write head") is None  # an ImageNet-21K class name
    with pytest.raises(UnknownClassError, match="names.txt.*no such file"):
        resolve_classes("names.txt", ["sky", "names.txt"])
    (tmp_path / "names.txt").write_text("sky\n")
    assert resolve_classes(str(tmp_path / "names.txt"), ["tree", "sky"]).tolist() == [1]
