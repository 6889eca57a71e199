"""Models shipped with the server: ``default.pt`` and its card ``default.card.json``.

``default.train.yaml`` is the config that trained it (see the card for the command).
"""

from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL = MODELS_DIR / "default.pt"
DEFAULT_CARD = MODELS_DIR / "default.card.json"
DEFAULT_CONFIG = MODELS_DIR / "default.train.yaml"
