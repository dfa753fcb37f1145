"""rerankq's Lua scripts: one file each in ``tasks/lua/``, every key and argument it takes listed at its top.

Each runs as one atomic step; those that only move what Redis holds already run on a full Redis too
(``memory.script``)."""

from __future__ import annotations

from functools import cache
from importlib import resources


@cache
def lua(name: str) -> str:
    """The source of ``tasks/lua/<name>.lua``."""
    return resources.files(__package__).joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")
