"""Which original config each packaged config reproduces, constant by constant.

``larvseg/reproductions.yaml`` is the single source: for every paper-reproducing packaged config it names
the original repository's config file and gives each constant's original value, and, where the packaged
config differs on purpose, the packaged value and why. :func:`constants` reads the same constants from a
loaded :class:`~larvseg.config.Config`; tests/test_reproductions.py checks that they agree for every
packaged config, and that ``docs/CONFIGS.md`` is :func:`render`'s output::

    python -m larvseg.reproductions            # rewrite docs/CONFIGS.md from the table
    python -m larvseg.reproductions --check    # exit 1 if docs/CONFIGS.md is out of date
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from larvseg.config import Config, load_config, parse_yaml
from larvseg.data.formats import FORMATS
from larvseg.data.mixing import source_batches
from larvseg.data.transforms import source_scale
from larvseg.log import setup_logging

TABLE_PATH = Path(__file__).with_name("reproductions.yaml")
DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "CONFIGS.md"


@dataclass
class Row:
    constant: str
    original: Any
    ours: Any  # what the packaged config must hold (= original unless the row differs on purpose)
    why: str = ""  # why it differs, or a note on the original's value

    @property
    def differs(self) -> bool:
        return self.ours != self.original


@dataclass
class Reproduction:
    config: str  # packaged config name
    original: str  # path of the original config in the original repository
    commit: str  # the original repository's commit it was read at
    choice: str  # which setting of the original's sweep, and why
    rows: list[Row]


def load_table(path: Path = TABLE_PATH) -> tuple[dict[str, Any], list[Reproduction]]:
    """The table's header (repository, notes, configs that reproduce nothing) and its reproductions."""
    tree = parse_yaml(path.read_text())
    reproductions = []
    for name, entry in tree["reproductions"].items():
        rows = []
        for constant, value in entry["constants"].items():
            if isinstance(value, dict):  # {original, ours?, why?}
                rows.append(
                    Row(constant, value["original"], value.get("ours", value["original"]), value.get("why", ""))
                )
            else:
                rows.append(Row(constant, value, value))
        reproductions.append(Reproduction(name, entry["original"], entry["commit"], entry.get("choice", ""), rows))
    return tree, reproductions


def _lambda_key(role: str) -> str:
    return "λ_seg" if role == "seg" else "λ_cls"


def constants(cfg: Config) -> dict[str, Any]:
    """The reproduction constants of a config, in the table's vocabulary (numbers, lists, short strings)."""
    d, m, t, e = cfg.data, cfg.model, cfg.train, cfg.eval
    out: dict[str, Any] = {
        "iterations": t.iters,
        "optimizer": f"SGD, lr {t.lr:g}, momentum {t.momentum:g}, weight decay {t.weight_decay:g}",
        "lr schedule": f"poly, power {t.poly_power:g}, min lr {t.min_lr:g}, no warm-up",
        "backbone": f"{m.arch}, {Path(m.pretrained).name or 'random init'}",
        "drop path": m.drop_path,
        "class sampling": m.num_sampled_classes if m.num_sampled_classes > 0 else "off",
        "rescale ratio range": list(d.ratio_range),
        "crop retry (cat_max_ratio)": d.cat_max_ratio,
        "photometric distortion": d.photometric,
        "evaluation": f"{d.eval.name} ({d.eval.format}, {d.eval.split or 'validation'})"
        + (f", classes {e.classes}" if e.classes else ""),
        "evaluation protocol": f"{e.mode} {e.crop_size}/{e.stride}, short side {e.short_side}, long side <= {e.max_long_side}",
        "loss weighting": "λ × each source's mean loss",
        "CAC": m.cac,
    }
    if m.cac:
        out.update(
            {
                "memory bank M": m.memory_bank_size,
                "warm-up (ring wraps)": m.warm_up,
                "background rule": f"top-{m.bg_topk} score > {m.bg_score_thresh:g}, MSE > {m.bg_mse_thresh:g}",
                "memory bank scope": "one bank, every rank's entries gathered",
            }
        )
    for source, role, images in source_batches(d):
        name = source.name
        out[f"{name}: data"] = f"{'masks' if role == 'seg' else 'tags'}, {source.format}" + (
            f" {source.classes}" if source.classes else ""
        )
        out[f"{name}: images per step"] = images
        out[f"{name}: crop"] = source.crop_size
        out[f"{name}: rescale (long, short)"] = list(source_scale(source, d))
        out[f"{name}: {_lambda_key(role)}"] = source.loss_weight
        if role == "tag" and m.cac:
            out[f"{name}: λ_cac"] = source.cac_weight
            out[f"{name}: K"] = source.cac_topk
        if FORMATS[source.format].image_level_only:  # no label map: nothing to retry a crop on
            out[f"{name}: crop retry"] = "none (no label map)"
    return out


def mismatches(rep: Reproduction, cfg: Config) -> list[str]:
    """Every way in which ``cfg`` differs from its row of the table (empty: it matches)."""
    got = constants(cfg)
    expected = {row.constant: row.ours for row in rep.rows}
    problems = [
        f"{rep.config}: {k}: table {expected[k]!r}, config {got[k]!r}"
        for k in expected
        if k in got and got[k] != expected[k]
    ]
    problems += [f"{rep.config}: {k}: in the table, not a constant of the config" for k in expected if k not in got]
    problems += [f"{rep.config}: {k} = {got[k]!r}: not in the table" for k in got if k not in expected]
    return problems


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int) and value >= 10_000:
        return f"{value:,}"
    if isinstance(value, list):
        return "(" + ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) + ")"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).replace("|", "\\|")


def render(path: Path = TABLE_PATH) -> str:
    """docs/CONFIGS.md: the table as Markdown, one section per packaged config."""
    tree, reproductions = load_table(path)
    repo = tree["repository"]
    lines = [
        "# Packaged configs and the original configs they reproduce",
        "",
        "<!-- Generated by `python -m larvseg.reproductions` from larvseg/reproductions.yaml; do not edit. -->",
        "",
        tree["intro"].strip(),
        "",
        "## Overview",
        "",
        "| packaged config | original config (in " + repo + ") | constants that differ on purpose |",
        "|---|---|---|",
    ]
    for rep in reproductions:
        differing = ", ".join(r.constant for r in rep.rows if r.differs) or "none"
        lines.append(f"| `{rep.config}` | `{rep.original}` | {differing} |")
    for name, why in tree["not_reproductions"].items():
        lines.append(f"| `{name}` | not a reproduction: {why} | |")
    lines += ["", "## Every constant", "", tree["legend"].strip()]
    for rep in reproductions:
        lines += [
            "",
            f"### `{rep.config}`",
            "",
            f"Original: [`{rep.original}`](https://github.com/{repo}/blob/{rep.commit}/{rep.original}) "
            f"(commit `{rep.commit[:8]}`).",
            "",
        ]
        if rep.choice:
            lines += [rep.choice.strip(), ""]
        lines += ["| constant | original | packaged | why / note |", "|---|---|---|---|"]
        order = {k: i for i, k in enumerate(constants(load_config(rep.config)))}  # the config's reading order
        for row in sorted(rep.rows, key=lambda r: order.get(r.constant, len(order))):
            ours = "same" if not row.differs else f"**{_cell(row.ours)}**"
            lines.append(f"| {row.constant} | {_cell(row.original)} | {ours} | {row.why.strip()} |")
    return "\n".join(lines) + "\n"


def check_all() -> list[str]:
    """Mismatches of every reproducing packaged config against the table."""
    _, reproductions = load_table()
    return [p for rep in reproductions for p in mismatches(rep, load_config(rep.config))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m larvseg.reproductions", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if docs/CONFIGS.md or a packaged config disagrees with the table"
    )
    args = parser.parse_args(argv)
    problems = check_all()
    for p in problems:
        print(p, file=sys.stderr)
    text = render()
    if args.check:
        if DOC_PATH.read_text() != text:
            print(f"{DOC_PATH} is out of date: run python -m larvseg.reproductions", file=sys.stderr)
            return 1
        return 1 if problems else 0
    DOC_PATH.write_text(text)
    print(f"wrote {DOC_PATH}")
    return 1 if problems else 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(main())
