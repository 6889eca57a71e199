"""The extrapolation watch of the MD interfaces (ASE calculator, i-PI driver, LAMMPS bridge): one implementation.

Every result of a head with extrapolation statistics carries the per-atom grade (dimensionless).  An atom
whose grade passes the model's threshold (``ModelInfo.extrapolation_threshold`` from ListModels; the
contract's :data:`~macefield_client.contract.EXTRAPOLATION_THRESHOLD` when the server reports none) sits in
an environment unlike anything in the model's reference (training) set: its results are extrapolation.
:class:`ExtrapolationMonitor` tells that once per run (a run's later structures are only counted), or raises
:class:`~macefield_client.ExtrapolationError` at every such structure, or stays silent; a model without
statistics is told once too (its results cannot say when they are extrapolation).
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

import numpy as np

from ..contract import EXTRAPOLATION_THRESHOLD
from ..core.errors import ExtrapolationError, ExtrapolationWarning, MACEFieldError
from ..core.results import Result

#: what a monitor may do when a structure passes the threshold
MODES = ("warn", "raise", "ignore")


#: folders whose frames a warning skips to reach the user's line: this package and ASE
_SKIPPED = (str(Path(__file__).resolve().parents[1]),)


def user_stacklevel() -> int:
    """The ``stacklevel`` for :func:`warnings.warn` called right here that points at the first frame outside
    ``macefield_client`` and ``ase`` (the user's line that asked ASE for a property), whatever the depth."""
    skipped = list(_SKIPPED)
    ase_file = getattr(sys.modules.get("ase"), "__file__", None)
    if ase_file:
        skipped.append(str(Path(ase_file).resolve().parent))
    frame: FrameType | None = sys._getframe(1)  # the caller of this function, which calls warnings.warn: stacklevel 1
    level = 1
    while frame is not None:
        filename = str(Path(frame.f_code.co_filename).resolve()) if frame.f_code.co_filename[:1] != "<" else ""
        if filename and not filename.startswith(tuple(skipped)):
            return level
        frame = frame.f_back
        level += 1
    return 1


def warn(message: str) -> None:
    """Tell as an :class:`~macefield_client.ExtrapolationWarning` (the ASE calculator), attributed to the
    user's line."""
    warnings.warn(message, ExtrapolationWarning, stacklevel=user_stacklevel())


def printer(prefix: str) -> Callable[[str], None]:
    """Tell as one line ``prefix: message`` on stderr (the MD bridges)."""
    def tell(message: str) -> None:
        print(f"{prefix}: {message}", file=sys.stderr, flush=True)
    return tell


class ExtrapolationMonitor:
    """Checks each result's extrapolation grade against the model's threshold; tells once, counts every one.

    Args:
        client: the :class:`~macefield_client.Client` whose ListModels gives the served model's threshold
            (asked once per model, at its first graded result); None: ``threshold`` or the contract's.
        mode: "warn" (tell once per monitor: the first structure above the threshold, or a model without
            statistics), "raise" (:class:`~macefield_client.ExtrapolationError` at every such structure and
            at a result without a grade) or "ignore" (count only).
        threshold: grade above which an atom is extrapolating, dimensionless; None: the model's.
        tell: how to tell once (default :func:`warn`; the bridges use :func:`printer`).
        once_note: appended to the told message (where the later ones are counted).
    """

    def __init__(self, client=None, *, mode: str = "warn", threshold: float | None = None,
                 tell: Callable[[str], None] = warn, once_note: str = "later ones are counted"):
        if mode not in MODES:
            raise ValueError(f'extrapolation: "warn", "raise" or "ignore", got {mode!r}')
        self.client = client
        self.mode = mode
        self.threshold = None if threshold is None else float(threshold)
        self.tell = tell
        self.once_note = once_note
        self.flagged = 0  #: results with an atom's grade above the threshold
        self.told = False
        self._thresholds: dict[str, float] = {}

    def threshold_for(self, model: str) -> float:
        """The threshold for results of served model ``model``: the given one, else ListModels', else 1."""
        if self.threshold is not None:
            return self.threshold
        if model not in self._thresholds:
            reported = 0.0
            if self.client is not None:
                try:
                    info = self.client.list_models()
                except MACEFieldError:  # the next result asks again
                    return EXTRAPOLATION_THRESHOLD
                reported = next((m.extrapolation_threshold for m in info.models if m.name == model), 0.0)
            self._thresholds[model] = reported if reported > 0 else EXTRAPOLATION_THRESHOLD
        return self._thresholds[model]

    def grade(self, r: Result) -> tuple[float, int]:
        """(largest grade, atoms above the threshold) of ``r``; (NaN, -1) for a result without a grade."""
        if r.extrapolation is None:
            return math.nan, -1
        threshold = self.threshold_for(r.model)
        return float(r.require("extrapolation_max")), int(np.sum(r.extrapolation > threshold))

    def check(self, r: Result, *, symbols: Sequence[str] | None = None,
              field: Sequence[float] | np.ndarray | None = None, step: int | None = None) -> tuple[float, int]:
        """Check one result (see the class doc); returns :meth:`grade`.

        ``symbols``: the structure's chemical symbols (named in the message); ``field``: its field, V/A;
        ``step``: the MD step (named in the message).
        """
        grade, above = self.grade(r)
        if self.mode == "ignore":
            if above > 0:
                self.flagged += 1
            return grade, above
        where = f"model {r.model!r}, head {r.head!r}"
        when = "" if step is None else f"step {step}: "
        if above < 0:
            self._report(f"{when}no extrapolation grade: {where} has no extrapolation statistics (macefield-calibrate "
                         "adds them); results cannot say when they are extrapolation", ExtrapolationError)
            return grade, above
        if above == 0:
            return grade, above
        self.flagged += 1
        threshold = self.threshold_for(r.model)
        grades = r.require("extrapolation")  # present: above > 0
        atom = int(np.argmax(grades))
        name = f" ({symbols[atom]})" if symbols is not None else ""
        message = (f"{when}extrapolation grade {grade:.3g} > {threshold:g} at atom {atom}{name}; {above} of "
                   f"{len(grades)} atoms above: this structure is unlike the model's training data ({where}) "
                   "and its results are extrapolation")
        if field is not None and np.any(field):
            message += (f"; at a field of {np.linalg.norm(field):.3g} V/A, which raises the grade by itself where "
                        "the model's reference set has no field (model card)")
        if self.mode == "raise":
            raise ExtrapolationError(message, grade=grade, atom=atom)
        self._report(f"{message} (shown once; {self.once_note})", None)
        return grade, above

    def _report(self, message: str, error: type | None) -> None:
        """Raise ``error`` (mode "raise"), or tell ``message`` if nothing was told yet."""
        if self.mode == "raise" and error is not None:
            raise error(message)
        if not self.told:
            self.told = True
            self.tell(message)


__all__ = ["MODES", "ExtrapolationMonitor", "printer", "user_stacklevel", "warn"]
