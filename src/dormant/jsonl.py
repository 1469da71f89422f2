"""JSON-lines files (a run's ``metrics.jsonl``): read tolerantly, rewritten atomically. No
other dormant import, so the report can read runs without the training loop."""
from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["read_jsonl", "write_jsonl"]


def read_jsonl(path: str | os.PathLike, upto_epoch: int | None = None) -> list[dict]:
    """The epochs logged in `path` (up to `upto_epoch`). A torn last line -- the process was
    killed while appending it -- is dropped; a damaged line before it raises ValueError."""
    path = Path(path)
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not JSON; the run's history is damaged: "
                             "delete the run directory to train it again") from None
    return [r for r in rows if upto_epoch is None or r.get("epoch", 0) <= upto_epoch]


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    """Replace `path` atomically (a kill leaves the old file or the new one, never half)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, path)
    except OSError:             # disk full: no half file left behind
        tmp.unlink(missing_ok=True)
        raise
