"""A progress bar: tqdm when installed, else a plain one on stderr."""

from __future__ import annotations

import sys
import time


class _Null:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class _Plain:
    """``desc: 40/100 (40%) 12.3/s`` rewritten in place at most 10 times a second."""

    def __init__(self, total: int, desc: str, stream=None):
        self.total, self.desc, self.n = total, desc, 0
        self.stream = stream or sys.stderr
        self.start = self._last = time.monotonic()
        self._draw()

    def _draw(self) -> None:
        rate = self.n / max(time.monotonic() - self.start, 1e-9)
        pct = 100.0 * self.n / self.total if self.total else 100.0
        self.stream.write(f"\r{self.desc}: {self.n}/{self.total} ({pct:.0f}%) {rate:.1f}/s")
        self.stream.flush()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= 0.1 or self.n >= self.total:
            self._last = now
            self._draw()

    def close(self) -> None:
        self._draw()
        self.stream.write("\n")
        self.stream.flush()


def progress_bar(total: int, enabled, desc: str = ""):
    """``enabled``: True, False, or None (on when stderr is a terminal and there is more than one item)."""
    if enabled is None:
        enabled = total > 1 and sys.stderr.isatty()
    if not enabled:
        return _Null()
    try:
        from tqdm import tqdm
    except ImportError:
        return _Plain(total, desc)
    return tqdm(total=total, desc=desc, unit="structure")


__all__ = ["progress_bar"]
