"""One DatasetFormat per format: every list of formats (config, command line, docs) is FORMATS, and a
new entry is all a new format needs."""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest

import larvseg
from cli_parsers import all_parsers
from larvseg import cli
from larvseg.config import ConfigError, DataConfig, SourceConfig, load_config
from larvseg.data import datasets
from larvseg.data import testing as T
from larvseg.data.formats import FORMATS, DatasetFormat, SplitFolders, markdown_table, shardable_formats
from larvseg.data.io import DatasetRootError
from larvseg.data.shard_writer import ShardWriter
from larvseg.data.sources import build_source_checked, build_vocabulary, source_class_names
from larvseg.data.vocabulary import VocabularyError, load_class_names
from larvseg.domains import DATASET_FORMATS

PACKAGE = Path(larvseg.__file__).resolve().parent
REPO = PACKAGE.parent


def test_the_names_below_the_data_layer_are_the_keys_of_FORMATS():
    assert tuple(FORMATS) == DATASET_FORMATS  # same order: error messages list them as FORMATS does
    assert all(name == fmt.name for name, fmt in FORMATS.items())
    format_domain = SourceConfig.DOMAINS["format"]
    assert all(format_domain.problem(name) is None for name in FORMATS)
    assert format_domain.problem("") is None  # data.eval only: no evaluation set
    with pytest.raises(ConfigError) as info:
        load_config("tiny_cpu", ["data.eval.format=ade2000"])
    assert all(name in str(info.value) for name in FORMATS)


def test_every_command_line_format_choice_is_FORMATS():
    choices = []
    for prog, parser in all_parsers(cli.build_parser()):
        for action in parser._actions:
            domain = getattr(action.type, "domain", None)
            if domain is not None and any(name in domain.allowed for name in FORMATS):
                accepted = [name for name in FORMATS if domain.problem(name) is None]
                assert accepted == list(FORMATS), f"{prog} {action.option_strings}: {accepted}"
                assert domain.problem("ade2000") is not None
                choices.append(f"{prog} {action.option_strings[0]}")
    assert choices == ["larvseg data shard --format"]


def test_data_shard_refuses_exactly_the_formats_that_are_not_shardable(tmp_path, capsys):
    refused = [name for name, fmt in FORMATS.items() if not fmt.shardable]
    assert refused == ["webdataset"] and shardable_formats() == [n for n in FORMATS if n not in refused]
    for name in refused:
        assert cli.main(["data", "shard", str(tmp_path), "--out", str(tmp_path / "out"), "--format", name]) == 1
        err = capsys.readouterr().err
        assert f"--format {name}: cannot be written as shards; choose one of {', '.join(shardable_formats())}" in err


def test_an_unknown_format_in_the_data_layer_lists_the_choices(tmp_path):
    source = SourceConfig(name="X", format="ade2000")
    for call in (
        lambda: source_class_names(source, tmp_path),
        lambda: build_source_checked(source, DataConfig(root=str(tmp_path)), None, "seg"),
    ):
        with pytest.raises(ValueError, match=re.escape(f"unknown format 'ade2000'; choose one of {sorted(FORMATS)}")):
            call()


@pytest.mark.parametrize("name", [n for n, f in FORMATS.items() if f.image_level_only])
def test_image_level_formats_are_tag_sources_only(tmp_path, name):
    assert name in ("imagenet", "custom_tags")
    for role in ("seg", "eval"):  # refused before any file is read
        with pytest.raises(ValueError, match=f"format {name} has no masks"):
            build_source_checked(
                SourceConfig(name="X", format=name), DataConfig(root=str(tmp_path / "none")), None, role
            )


def test_packaged_class_lists_are_the_formats_class_names(tmp_path):
    for name in ("ade150", "ade847", "coco171"):
        assert FORMATS[name].class_names(SourceConfig(format=name), tmp_path, tmp_path) == load_class_names(name)


def test_a_new_format_is_one_entry(tmp_path, monkeypatch):
    """A layout FORMATS does not know, added as one entry: its default folder, split spellings, class list,
    builder and shard role are all read from it."""
    T.write_custom_seg(tmp_path / "TOY", ["cat", "dog"], n=3)
    for kind in ("images", "annotations"):  # into the toy format's split folder
        files = list((tmp_path / "TOY" / kind).iterdir())
        (tmp_path / "TOY" / kind / "trn").mkdir()
        for f in files:
            shutil.move(f, tmp_path / "TOY" / kind / "trn" / f.name)
    T.write_custom_tags(tmp_path / "TOYTAGS", ["cat", "bird"])
    monkeypatch.setitem(
        FORMATS,
        "toy_seg",
        DatasetFormat(
            "toy_seg",
            "test layout",
            lambda s, folder, r: ["cat", "dog"],
            datasets.build_custom_seg,
            "TOY",
            SplitFolders(("trn",), ("val",)),
        ),
    )
    monkeypatch.setitem(
        FORMATS,
        "toy_tags",
        DatasetFormat(
            "toy_tags",
            "test tags",
            lambda s, folder, r: ["cat", "bird"],
            datasets.build_custom_tags,
            "TOYTAGS",
            image_level_only=True,
        ),
    )
    seg, tag = SourceConfig(name="toy", format="toy_seg"), SourceConfig(name="tt", format="toy_tags")
    cfg = T.make_config(tmp_path, seg=[seg], tag=[tag], eval_source=seg)
    vocab = build_vocabulary(cfg)
    assert vocab.names == ["cat", "dog", "bird"]
    built = build_source_checked(seg, cfg.data, vocab, "seg")
    assert built.split.folder == "trn" and built.split.detected and len(built.dataset) == 3
    with pytest.raises(DatasetRootError, match="no validation split folder: looked for val"):
        build_source_checked(seg, cfg.data, vocab, "eval")
    tags = build_source_checked(tag, cfg.data, vocab, "tag").dataset
    assert (
        len(tags) == 4
        and sorted(vocab.names[int(tags.load(i)["tags"][0])] for i in range(4)) == ["bird"] * 2 + ["cat"] * 2
    )
    with pytest.raises(ValueError, match="format toy_tags has no masks"):
        build_source_checked(tag, cfg.data, vocab, "seg")
    index = ShardWriter(tag, cfg.data, tmp_path / "shards", 10**9, progress=False).run()
    assert index["kind"] == "tag" and index["class_names"] == ["cat", "bird"] and index["samples"] == 4
    assert "| `toy_seg` | `TOY` | trn / val | no | yes | test layout |" in markdown_table().splitlines()


def _layout_table_formats(text: str) -> list[str]:
    """The format column of the reST table in datasets.py's docstring (rows between its 2nd and 3rd rule)."""
    lines = text.splitlines()
    rules = [i for i, line in enumerate(lines) if line.startswith("=") and set(line) <= {"=", " "}]
    assert len(rules) == 3, "datasets.py's docstring: one table (header rule, header, rule, rows, rule)"
    return [line.split()[0] for line in lines[rules[1] + 1 : rules[2]] if line and not line[0].isspace()]


def test_the_docs_show_FORMATS():
    page = (REPO / "docs" / "DATASETS.md").read_text()
    table = re.search(r"<!-- formats table: .*? -->\n(.*?)\n<!-- end of formats table -->", page, re.S)
    assert table and table.group(1) == markdown_table(), "paste markdown_table() into docs/DATASETS.md"
    assert _layout_table_formats(ast.get_docstring(ast.parse((PACKAGE / "data" / "datasets.py").read_text()))) == list(
        FORMATS
    )
    named = set()
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        named |= {(doc.name, m) for m in re.findall(r"(?:\bformat[:=] ?|--format )`?([a-z0-9_]+)", doc.read_text())}
    assert {"custom_seg", "custom_tags", "webdataset"} <= {m for _, m in named}  # the pattern sees the docs
    assert [(doc, m) for doc, m in sorted(named) if m not in FORMATS] == []
    assert "## Adding a format" in page and "larvseg/data/formats.py" in (REPO / "docs" / "ARCHITECTURE.md").read_text()


def _code_strings(path: Path) -> list[tuple[int, str]]:
    """String constants of a module's code (docstrings left out)."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and n.body
        and isinstance(n.body[0], ast.Expr)
        and isinstance(n.body[0].value, ast.Constant)
    }
    return [
        (n.lineno, n.value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings
    ]


def test_no_other_module_decides_by_format_name():
    """Format names that are not also names of packaged class lists (ade150, ... name those too) appear in
    code only in FORMATS and in the names of larvseg.domains."""

    def packaged(name: str) -> bool:
        try:
            load_class_names(name)
            return True
        except VocabularyError:
            return False

    format_only = {name for name in FORMATS if not packaged(name)}
    assert format_only == {"imagenet", "custom_seg", "custom_tags", "webdataset"}
    allowed = {("larvseg/data/formats.py", n) for n in format_only} | {("larvseg/domains.py", n) for n in format_only}
    # the config cannot see FORMATS (it is checked below the data layer): object masks are an imagenet key
    allowed.add(("larvseg/config.py", "imagenet"))
    found = [
        (str(p.relative_to(REPO)), line, s)
        for p in sorted(PACKAGE.rglob("*.py"))
        for line, s in _code_strings(p)
        if s in format_only
    ]
    assert {s for p, _, s in found if p == "larvseg/data/formats.py"} == format_only  # the scan sees the entries
    assert [(p, line, s) for p, line, s in found if (p, s) not in allowed] == []
