"""rerankq's Lua scripts: one file each in ``tasks/lua/``, every key and argument it takes listed at its top.

Each runs as one atomic step; those that only move what Redis holds already run on a full Redis too
(``memory.script``)."""

from __future__ import annotations

from functools import cache
from importlib import resources


@cache
def lua(name: str) -> str:
    """The source of ``tasks/lua/<name>.lua``, less the comment at its top: ``EVAL`` sends a script's whole text
    with every call, and several run once per receive or per batch of acks."""
    lines = resources.files(__package__).joinpath("lua", f"{name}.lua").read_text(encoding="utf-8").splitlines(True)
    while lines and lines[0].startswith("--"):
        lines.pop(0)
    return "".join(lines)
