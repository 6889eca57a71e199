"""Injected compute faults, for the fault-tolerance tests of real server processes.

Read from ``$MACEFIELD_TEST_FAULT`` once when a server starts (off when unset);
the batcher calls :meth:`InjectedFault.check` at each batch boundary.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Dict, Mapping, Optional

log = logging.getLogger("macefield.testing")


class InjectedFault:
    """Test-only compute faults at the batch boundary, from ``$MACEFIELD_TEST_FAULT`` (off when unset).

    Read once when the server starts; comma-separated:

    * ``oom_above_atoms=N``: every engine pass (after any split) with more than
      N atoms raises an out-of-memory RuntimeError, as CUDA would: batches are
      split in halves, a lone structure above N atoms gets RESOURCE_EXHAUSTED.
    * ``error_on_batch=K``: the K-th batch computed after warm-up (1-based)
      raises a generic RuntimeError: its requests get INTERNAL, later batches
      are served.
    * ``compute_delay_s=S``: every batch after warm-up takes S more seconds
      (a slow model: drain and shutdown tests).
    * ``load_delay_s=S``: the server waits S seconds before loading its models
      (health NOT_SERVING meanwhile: probe tests see a replica that is loading).

    For fault tests only; never set it in production.
    """

    ENV = "MACEFIELD_TEST_FAULT"
    KEYS = ("oom_above_atoms", "error_on_batch", "compute_delay_s", "load_delay_s")

    def __init__(self, oom_above_atoms: Optional[int] = None, error_on_batch: Optional[int] = None,
                 compute_delay_s: Optional[int] = None, load_delay_s: Optional[int] = None):
        self.oom_above_atoms = oom_above_atoms
        self.error_on_batch = error_on_batch
        self.compute_delay_s = compute_delay_s
        self.load_delay_s = load_delay_s
        self.batches = 0

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> Optional["InjectedFault"]:
        text = (environ if environ is not None else os.environ).get(cls.ENV, "").strip()
        if not text:
            return None
        values: Dict[str, int] = {}
        for part in text.split(","):
            key, sep, value = part.strip().partition("=")
            if key not in cls.KEYS or not sep or not value.strip().isdigit():
                raise ValueError(f"{cls.ENV}: expected comma-separated {'=N, '.join(cls.KEYS)}=N, got {text!r}")
            values[key] = int(value)
        fault = cls(**values)
        log.warning("%s=%s: injecting compute faults (test only)", cls.ENV, text)
        return fault

    def next_batch(self) -> bool:
        """Count one served batch; whether it is the one that fails."""
        self.batches += 1
        return self.error_on_batch is not None and self.batches == self.error_on_batch

    def check(self, n_atoms: int, error: bool) -> None:
        if self.compute_delay_s:
            time.sleep(self.compute_delay_s)
        if error:
            raise RuntimeError(f"injected compute error on batch {self.batches} ({self.ENV})")
        if self.oom_above_atoms is not None and n_atoms > self.oom_above_atoms:
            raise RuntimeError(
                f"CUDA out of memory (injected: {n_atoms} atoms > {self.oom_above_atoms}, {self.ENV})"
            )
