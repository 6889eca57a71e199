"""Per-step text logs of the MD bridges: a commented header naming every column and its unit, then one row per line.

Readable with ``numpy.loadtxt(path)`` (``#`` lines are comments).
"""

from __future__ import annotations

import io
from collections.abc import Sequence


class StepLog:
    """Whitespace-separated columns; floats in full double precision (``%.17g``)."""

    def __init__(self, path, columns: Sequence[tuple[str, str]], title: str = ""):
        self.columns = list(columns)
        self._fh: io.TextIOBase = open(path, "w")  # noqa: SIM115 - open for the log's lifetime; closed by close()
        if title:
            self._fh.write(f"# {title}\n")
        self._fh.write("# " + " ".join(f"{name}[{unit}]" if unit else name for name, unit in self.columns) + "\n")
        self._fh.flush()

    def write(self, values: Sequence[float]) -> None:
        values = list(values)
        if len(values) != len(self.columns):
            raise ValueError(f"log row: {len(values)} values for {len(self.columns)} columns")
        self._fh.write(" ".join(str(v) if isinstance(v, int) else f"{v:.17g}" for v in values) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()


__all__ = ["StepLog"]
