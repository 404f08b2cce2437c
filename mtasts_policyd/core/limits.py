"""Declared ranges of configuration fields, read by config.validate().

A leaf module (it imports nothing of ours), so that the settings dataclasses of every module
(discovery, fetch, resolution, ...) can declare their ranges next to their defaults without an
import cycle through config.py, which re-exports `limits`.

    idle_timeout: float = field(default=60.0, metadata=limits(min=0.1, max=86400))

The metadata is a plain dict, so `metadata={"min": 1}` means the same. Keys:
- "min", "max": inclusive bounds; for numbers the value, for strings, tuples and mappings their
  length (`maps: ... metadata=limits(min=1)`: at least one name).
- "choices": the allowed values.
- "check": a function of the (non-None) value that raises ValueError with a message.
Every float is also checked to be finite (no .nan, no .inf).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any


def limits(min: float | None = None, max: float | None = None, choices: Collection[Any] | None = None,
           check: Callable[[Any], object] | None = None) -> dict[str, Any]:
    """Field metadata for config.validate(); see the module docstring."""
    return {"min": min, "max": max, "choices": choices, "check": check}
