"""Output files written whole: under a temporary name beside the target, then renamed over it, so that a reader
never sees half a file and a killed job leaves the previous version."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_text(text: str, path: Path) -> Path:
    """`text` at `path` (folders made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    partial.replace(path)
    return path


def write_json(data: Any, path: Path, default: Callable[[Any], Any] | None = None) -> Path:
    """`data` as indented JSON at `path`; `default` turns what JSON cannot hold into what it can."""
    return write_text(json.dumps(data, indent=1, default=default) + "\n", path)
