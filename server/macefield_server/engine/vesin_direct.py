"""vesin's CPU half neighbour list called through its C function, without the Python wrapper's per-call work.

``vesin.NeighborList.compute`` rebuilds its options, converts and checks its inputs and turns the C
results into arrays through ``np.ctypeslib`` on every call: about 15 us, a twentieth of a 72-atom
search.  :class:`DirectHalfList` builds the options once and copies the C results straight into numpy
arrays of the wrapper's dtypes (i, j uint64; S int32; d float64), the same values in the same order
(tests/test_neighbour_lists.py compares the two).  The C call releases the GIL, as the wrapper's does.
:func:`direct_half_list` returns None when the installed vesin does not have the C interface this
module was written for (the caller then uses the wrapper).
"""

from __future__ import annotations

import ctypes
from typing import Optional, Tuple

import numpy as np


class _NeighborList(ctypes.Structure):
    """vesin's ``VesinNeighborList`` with its pointers as plain addresses (the same layout)."""

    _fields_ = [("length", ctypes.c_size_t), ("device_type", ctypes.c_int), ("device_id", ctypes.c_int),
                ("pairs", ctypes.c_void_p), ("shifts", ctypes.c_void_p), ("distances", ctypes.c_void_p),
                ("vectors", ctypes.c_void_p), ("opaque", ctypes.c_void_p)]


class DirectHalfList:
    """One cutoff's half list (each unordered pair once, unsorted, one thread) on the CPU; not thread-safe
    (one per thread: it owns vesin's result buffers, reused between calls).

    Call with float64 C-contiguous positions (N, 3) and cell (3, 3) (Angstrom) and a bool (3,) pbc;
    returns (i, j, S, d) as ``vesin.NeighborList(..., full_list=False).compute(..., "ijSd")`` does.
    """

    def __init__(self, cutoff: float):
        from vesin._c_api import VesinAutoAlgorithm, VesinCPU, VesinDevice, VesinNeighborList, VesinOptions
        from vesin._neighbors import get_library  # type: ignore[attr-defined]

        if ctypes.sizeof(_NeighborList) != ctypes.sizeof(VesinNeighborList):
            raise ImportError("vesin's VesinNeighborList layout differs from the one this module reads")
        library = get_library()
        handle = ctypes.CDLL(library._name)  # its own function objects: vesin's argtypes stay as they are
        self._neighbors_fn = handle.vesin_neighbors
        self._neighbors_fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p,
                                       VesinDevice, VesinOptions, ctypes.POINTER(_NeighborList),
                                       ctypes.POINTER(ctypes.c_char_p)]
        self._neighbors_fn.restype = ctypes.c_int
        self._free = handle.vesin_free
        self._free.argtypes = [ctypes.POINTER(_NeighborList)]
        self._free.restype = None
        options = VesinOptions()
        options.cutoff = float(cutoff)
        options.full = False
        options.sorted = False
        options.algorithm = VesinAutoAlgorithm
        options.skin = 0.0
        options.n_threads = 1
        options.return_shifts = True
        options.return_distances = True
        options.return_vectors = False
        self._options = options
        self._device = VesinDevice(VesinCPU, 0)
        self._result = _NeighborList()
        self._result_ref = ctypes.byref(self._result)
        self._error = ctypes.c_char_p()
        self._error_ref = ctypes.byref(self._error)

    def __call__(self, positions: np.ndarray, cell: np.ndarray,
                 pbc: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        positions = np.ascontiguousarray(positions, dtype=np.float64)
        cell = np.ascontiguousarray(cell, dtype=np.float64)
        pbc = np.ascontiguousarray(pbc, dtype=bool)
        if positions.ndim != 2 or positions.shape[1] != 3 or cell.shape != (3, 3) or pbc.shape != (3,):
            raise ValueError(f"positions (N, 3), cell (3, 3), pbc (3,) expected, got {positions.shape}, "
                             f"{cell.shape}, {pbc.shape}")
        status = self._neighbors_fn(positions.ctypes.data, positions.shape[0], cell.ctypes.data, pbc.ctypes.data,
                                    self._device, self._options, self._result_ref, self._error_ref)
        if status != 0:
            raise RuntimeError((self._error.value or b"vesin_neighbors failed").decode("utf8"))
        result = self._result
        m = int(result.length)
        pairs = np.empty((m, 2), dtype=np.uint64)
        shifts = np.empty((m, 3), dtype=np.int32)
        distances = np.empty(m, dtype=np.float64)
        if m:
            ctypes.memmove(pairs.ctypes.data, result.pairs, pairs.nbytes)
            ctypes.memmove(shifts.ctypes.data, result.shifts, shifts.nbytes)
            ctypes.memmove(distances.ctypes.data, result.distances, distances.nbytes)
        return pairs[:, 0].copy(), pairs[:, 1].copy(), shifts, distances

    def __del__(self):  # only attributes: at interpreter exit this module's globals may be gone already
        reference = getattr(self, "_result_ref", None)
        if reference is not None:
            self._free(reference)


#: vesin releases whose C interface this module was checked against (tests/test_neighbour_lists.py compares
#: its results with the wrapper's byte for byte); any other release goes through vesin's own wrapper
TESTED_VESIN = ("0.6.2",)


def direct_half_list(cutoff: float) -> Optional[DirectHalfList]:
    """A :class:`DirectHalfList`, or None when the installed vesin is not a release this module was checked
    against or lacks the C interface it reads (the caller then uses vesin's wrapper)."""
    try:
        import vesin

        if getattr(vesin, "__version__", None) not in TESTED_VESIN:
            return None
        return DirectHalfList(cutoff)
    except (ImportError, AttributeError, OSError):
        return None
