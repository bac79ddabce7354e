"""Every paper-reproducing packaged config equals its row of larvseg/reproductions.yaml (the original
config it reproduces, constant by constant), and docs/CONFIGS.md is generated from that table."""

from __future__ import annotations

import pytest

from larvseg.config import CONFIG_DIR, load_config
from larvseg.reproductions import DOC_PATH, constants, load_table, mismatches, render

TABLE, REPRODUCTIONS = load_table()


def test_every_packaged_config_is_in_the_table():
    packaged = {p.stem for p in CONFIG_DIR.glob("*.yaml")}
    listed = [r.config for r in REPRODUCTIONS]
    assert len(listed) == len(set(listed))
    assert packaged == set(listed) | set(TABLE["not_reproductions"])
    # the two masks + ImageNet families, each with its baseline twin
    assert {"c171_in124", "c171_in124_baseline", "c171_in585", "c171_in585_baseline"} <= set(listed)


@pytest.mark.parametrize("rep", REPRODUCTIONS, ids=lambda r: r.config)
def test_packaged_config_equals_its_row(rep):
    assert mismatches(rep, load_config(rep.config)) == []
    assert rep.original.startswith("configs/") and rep.original.endswith(".py") and len(rep.commit) == 40
    # a row that differs on purpose says why
    assert all(row.why for row in rep.rows if row.differs)


def test_a_config_that_drifts_from_the_table_is_named():
    rep = next(r for r in REPRODUCTIONS if r.config == "c171_a150w_in124")
    cfg = load_config(
        rep.config, ["model.bg_score_thresh=0.2", "data.tag_sources.1.scale=[]", "data.tag_sources.0.cac_topk=20"]
    )
    problems = "\n".join(mismatches(rep, cfg))
    assert "background rule: table 'top-5 score > 0.35, MSE > 2', config 'top-5 score > 0.2, MSE > 2'" in problems
    assert "IN124: rescale (long, short): table [320, 320], config [2048, 512]" in problems
    assert "A150w: K: table 40, config 20" in problems
    # a constant the table does not list is an error too
    cfg = load_config(rep.config, ["data.seg_sources.0.name=C164"])
    assert any("C164: crop = 512: not in the table" in p for p in mismatches(rep, cfg))


def test_constants_read_the_per_source_batch_and_rescale():
    got = constants(load_config("c171_a847w_in585"))
    assert [got[f"{s}: images per step"] for s in ("C171", "A847w", "IN585")] == [6, 6, 4]
    assert got["IN585: rescale (long, short)"] == [320, 320] and got["A847w: rescale (long, short)"] == [2048, 512]
    assert got["class sampling"] == 100 and constants(load_config("c171_a847w_baseline"))["class sampling"] == "off"


def test_docs_table_is_generated_from_the_data_file():
    assert DOC_PATH.read_text() == render(), "docs/CONFIGS.md is stale: run python -m larvseg.reproductions"
