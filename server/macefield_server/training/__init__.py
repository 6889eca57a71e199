"""Training FieldMACE models: ``macefield-train``.

Public API::

    from macefield_server.training import load_config, Trainer, fold_dipole
"""

from .config import ConfigError, TrainConfig, config_from_dict, load_config
from .losses import fold_dipole, folded_polarization_residual, huber
from .trainer import Trainer

__all__ = ["ConfigError", "TrainConfig", "config_from_dict", "load_config", "fold_dipole",
           "folded_polarization_residual", "huber", "Trainer"]
