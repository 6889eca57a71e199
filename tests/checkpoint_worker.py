"""Load checkpoints and evaluate them on fixed structures; run as a script, optionally without cuequivariance.

    python tests/checkpoint_worker.py [--block-cueq] OUT.npz NAME=PATH ...

NAME=default loads the embedded default model (PATH ignored); pickles load
with trust.  ``--block-cueq`` makes every ``cuequivariance*`` import fail
before anything is imported, as on a machine where it is not installed.
Used by tests/test_checkpoint_environments.py.
"""

from __future__ import annotations

import importlib.abc
import sys

BLOCKED = ("cuequivariance", "cuequivariance_torch", "cuequivariance_ops_torch")


class _BlockCueq(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by checkpoint_worker)")
        return None


def cueq_importable() -> bool:
    try:
        import cuequivariance  # noqa: F401
    except ImportError:
        return False
    return True


def evaluate_checkpoints(specs):
    """{f"{name}/{output}/{i}": array} for each (name, path) in ``specs``."""
    import numpy as np
    from conftest import quartz_like, sio_molecule

    from macefield_server.engine import load_model, predict
    from macefield_server.serving.registry import load_default_model

    results = {}
    for name, path in specs:
        if name == "default":
            model = load_default_model().model
        else:
            model = load_model(path, trust_pickle=not path.endswith(".pt"))
        zs = sorted(int(z) for z in model.atomic_numbers)
        atoms = [quartz_like(seed=3), sio_molecule()]
        for a in atoms:  # the model's own elements (the default model knows Si and O too)
            assert set(a.numbers) <= set(zs), (name, zs)
        heads = list(model.heads)
        out = predict(model, atoms, electric_fields=[[0.1, -0.2, 0.05], [0.0, 0.3, -0.1]],
                      heads=[heads[0], heads[-1]], outputs="all")
        for i, r in enumerate(out):
            for key, value in r.items():
                results[f"{name}/{key}/{i}"] = np.asarray(value)
    return results


def main(argv):
    block = argv[:1] == ["--block-cueq"]
    if block:
        sys.meta_path.insert(0, _BlockCueq())
        argv = argv[1:]
    import numpy as np

    out, specs = argv[0], [tuple(a.split("=", 1)) for a in argv[1:]]
    results = evaluate_checkpoints(specs)
    results["cueq_importable"] = np.asarray(cueq_importable())
    np.savez(out, **results)


if __name__ == "__main__":
    main(sys.argv[1:])
