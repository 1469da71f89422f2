"""Progress bars: tqdm when installed and wanted, else nothing."""
from __future__ import annotations

import sys


def progress(total: int, desc: str, enabled: bool = True):
    """A tqdm bar writing to stderr, or None (no tqdm, disabled, or not a terminal)."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True,
                disable=not sys.stderr.isatty())
