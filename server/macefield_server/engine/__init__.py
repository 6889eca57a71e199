"""The engine: the field-aware MACE model, its checkpoints and the exact response (F and its derivatives).

Public API::

    from macefield_server.engine import FieldMACE, upgrade_to_field, load_model, save_model, predict
"""

import warnings

# TorchScript annotation chatter from e3nn/mace on import; not actionable for users
warnings.filterwarnings("ignore", message="The TorchScript type system doesn't support")
warnings.filterwarnings("ignore", message=".*TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD.*")

import contextlib  # noqa: E402
import io  # noqa: E402
import logging  # noqa: E402

# mace-torch prints "cuequivariance or cuequivariance_torch is not available ..." on import when the optional
# cuEquivariance packages are missing: the e3nn backend needs neither, so that is said once, at debug level;
# asking for the cueq backend without them is an error that says it (engine.cueq.resolve_backend)
with contextlib.redirect_stdout(io.StringIO()) as _said:
    import mace  # noqa: E402,F401  (must precede e3nn on torch >= 2.6)
    import mace.tools.cg  # noqa: E402,F401  (where the message is printed)
for _line in _said.getvalue().splitlines():
    logging.getLogger("macefield.engine").debug("mace-torch: %s", _line)
del _said

from .architecture import build_field_mace, default_architecture, describe_architecture  # noqa: E402
from .checkpoint import CheckpointError, UntrustedPickleError, load_model, save_model, upgrade_to_field  # noqa: E402
from .field_mace import FieldMACE  # noqa: E402
from .graph import Structure  # noqa: E402
from .predict import evaluate, predict, prepare_batch  # noqa: E402
from .response import ENGINE_OUTPUTS, respond  # noqa: E402

__all__ = [
    "FieldMACE",
    "upgrade_to_field",
    "load_model",
    "save_model",
    "predict",
    "prepare_batch",
    "evaluate",
    "respond",
    "Structure",
    "ENGINE_OUTPUTS",
    "build_field_mace",
    "default_architecture",
    "describe_architecture",
    "CheckpointError",
    "UntrustedPickleError",
]
