"""The model shipped with the server (weights, not code): ``default.pt`` and its card ``default.card.json``.

``default.stage1.yaml`` (from scratch) and ``default.stage2.yaml`` to
``default.stage5.yaml`` (fine-tuning, each from the previous ``default.pt``;
stage 4 adds the ZBL pair repulsion and the short-range hinge, stage 5 widens
the model to max_ell 2 and adds the core repulsion) are the configs that
trained it, in that order; the card names the commands.
"""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL = WEIGHTS_DIR / "default.pt"
DEFAULT_CARD = WEIGHTS_DIR / "default.card.json"
#: training configs of the default model, in the order they were run
DEFAULT_TRAINING_STAGES = tuple(WEIGHTS_DIR / f"default.stage{i}.yaml" for i in (1, 2, 3, 4, 5))
