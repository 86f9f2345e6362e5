"""Kept while the stages move to lightning_modules.config and lightning_modules.training."""

from lightning_modules.config import *  # noqa: F403
from lightning_modules.config import CONF_DIR  # noqa: F401
from lightning_modules.training import *  # noqa: F403
from lightning_modules.training import WANDB_ID_FILE, _last_checkpoint  # noqa: F401
