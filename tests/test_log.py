"""The console logging of larvseg.log: one handler, set up by the entry points; rank 0 shows status lines
(stdout), the other ranks only warnings (stderr), every rank everything with --debug."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from larvseg.cli import main
from larvseg.config import Config, EvalConfig, ModelConfig
from larvseg.log import LOGGER_NAME, ConsoleHandler, has_console, setup_logging
from larvseg.models.segmenter import build_segmenter
from larvseg.train.checkpoint import save_checkpoint

log = logging.getLogger("larvseg.test_log")  # a module logger of the package, as the library's modules have


@pytest.fixture
def restore_logger():
    """Leave the ``larvseg`` logger as it was (other tests run the CLI in this process too)."""
    logger = logging.getLogger(LOGGER_NAME)
    handlers, level = list(logger.handlers), logger.level
    yield logger
    logger.handlers[:] = handlers
    logger.setLevel(level)


def _consoles(logger: logging.Logger) -> list[logging.Handler]:
    return [h for h in logger.handlers if isinstance(h, ConsoleHandler)]


def test_rank_0_shows_info_on_stdout_and_warnings_on_stderr_tersely(restore_logger, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    setup_logging()
    log.debug("not shown")
    log.info("done: %s", "work_dirs/x")
    log.warning("source %s: skipped %d files", "C171", 2)
    log.error("gave up")
    out, err = capsys.readouterr()
    assert out == "done: work_dirs/x\n"  # the message alone: no time stamp, level or logger name
    assert err == "warning: source C171: skipped 2 files\nerror: gave up\n"


def test_setting_up_twice_keeps_one_handler_and_prints_each_line_once(restore_logger, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    setup_logging()
    setup_logging()
    assert len(_consoles(restore_logger)) == 1 and has_console()
    log.info("once")
    assert capsys.readouterr().out == "once\n"


def test_rank_1_prints_nothing_at_info_but_its_warnings_and_everything_with_debug(restore_logger, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")  # as torchrun sets it for the second process
    setup_logging()
    log.info("resumed from iter_2.pth at step 2")
    log.warning("step 3: skipped 1 unreadable samples of S: x.png")
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "[rank 1] warning: step 3: skipped 1 unreadable samples of S: x.png\n"
    setup_logging(debug=True)  # --debug / LARVSEG_DEBUG=1: every rank shows everything
    log.debug("a detail")
    log.info("a status line")
    assert capsys.readouterr().out == "[rank 1] a detail\n[rank 1] a status line\n"


def test_library_records_reach_caplog_and_the_application_without_a_console_handler(restore_logger, caplog, capsys):
    restore_logger.handlers[:] = [h for h in restore_logger.handlers if not isinstance(h, ConsoleHandler)]
    restore_logger.setLevel(logging.NOTSET)
    with caplog.at_level(logging.INFO, logger=LOGGER_NAME):
        log.info("a status line")
    assert caplog.messages == ["a status line"]
    assert capsys.readouterr() == ("", "")  # library use: no console output of its own


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    cfg = Config(
        model=ModelConfig(arch="vit_mini", drop_path=0.0, cac=False), eval=EvalConfig(mode="whole", short_side=0)
    )
    folder = tmp_path_factory.mktemp("log")
    path = folder / "small.pth"
    save_checkpoint(
        path,
        {
            "model": build_segmenter(cfg.model, 3).state_dict(),
            "config": cfg.to_dict(),
            "vocab": ["sky", "tree", "road"],
            "supervised": [0, 1, 2],
        },
    )
    image = folder / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(image)
    return path, image


@pytest.mark.parametrize("rank", ["0", "1"])
def test_the_cli_sets_up_one_handler_and_rank_1_prints_no_status(
    restore_logger, small_checkpoint, tmp_path, capsys, monkeypatch, rank
):
    checkpoint, image = small_checkpoint
    monkeypatch.setenv("RANK", rank)
    for run in range(2):  # the CLI run twice in one process: still one handler, each line once
        assert (
            main(["predict", str(checkpoint), str(image), "--out", str(tmp_path / f"out{run}"), "--device", "cpu"]) == 0
        )
        assert len(_consoles(restore_logger)) == 1
        out = capsys.readouterr().out
        assert out.count("wrote label maps") == 1  # the command's product: printed on every rank
        assert out.count("intra-op thread") == (1 if rank == "0" else 0)  # a status line: rank 0 only
