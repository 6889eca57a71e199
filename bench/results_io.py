"""Writing a benchmark's JSON result (every script in bench/ writes one, normally into bench/results/)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

RESULTS = Path(__file__).resolve().parent / "results"


def write_json(path: str | Path, result: Mapping[str, Any], *, indent: int = 1, say: bool = True) -> Path:
    """Write ``result`` to ``path`` (its folder made if needed); print ``wrote PATH`` unless ``say`` is False."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=indent) + "\n")
    if say:
        print(f"wrote {path}", flush=True)
    return path
