"""Every (sub-)command parser of ``larvseg`` (imported by the CLI tests beside it)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator


def all_parsers(
    parser: argparse.ArgumentParser, prefix: str = "larvseg"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """(command line prefix, parser) of ``parser`` and of every sub-command below it, depth first."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from all_parsers(sub, f"{prefix} {name}")
