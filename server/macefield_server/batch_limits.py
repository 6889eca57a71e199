"""How many atoms and edges one engine pass takes when the caller does not say: one policy for the server's
batcher (:class:`macefield_server.serving.config.BatchingConfig`, ``max_atoms`` / ``max_edges`` "auto") and the
in-process :func:`macefield_server.engine.predict` (``max_edges="auto"``).  Imports nothing (no torch).

On CPU a larger pass is *slower per structure* once its working set leaves the caches (the max_ell-1 default model
of stages 1-4, full response, 1 thread, 2-core x86 CPU: a 72-atom quartz cell, ~3000 edges, costs 0.23 s alone or
in pairs, 0.41 s per cell in batches of 8 and 0.77 s in one batch of 64; 9-atom cells, ~380 edges, 56 ms alone and
33-36 ms in batches of 4-8; energy + forces alike: 0.5 s per cell alone, 0.76 s in a 48k-edge pass), so CPU passes
stop at ~4000 edges: small structures are batched, 72-atom cells are not. GPUs want big passes; the CUDA limits are
placeholders until bench/gpu_suite.py's engine section measures throughput against batch size.
"""

from typing import Dict, Tuple

#: (max_atoms, max_edges) per engine pass, by device type; other device types take "cuda"'s
AUTO_LIMITS: Dict[str, Tuple[int, int]] = {"cpu": (1024, 4000), "cuda": (8192, 400_000)}


def auto_limits(device_type: str) -> Tuple[int, int]:
    """(max_atoms, max_edges) per pass for a model on ``device_type`` ("cpu", "cuda", ...)."""
    return AUTO_LIMITS.get(device_type, AUTO_LIMITS["cuda"])
