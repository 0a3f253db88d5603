"""Training: the public :class:`Trainer` API, the configuration, the run loop and its state.

- :mod:`.config`: :class:`TrainConfig` (YAML + ``key=value`` overrides).
- :mod:`.trainer`: :class:`Trainer` (``start_epoch``, ``step``): the released recipe, one
  optimiser step at a time, alone or under torchrun.
- :mod:`.loop`: :func:`fit` (what ``eslmatch train`` runs), :func:`train_one_epoch`,
  :func:`validate`.
- :mod:`.state`: :class:`TrainState`, RNG states, the resumable state file.
"""

from .config import TrainConfig, load_train_config, parse_overrides
from .loop import TrainResult, fit, train_one_epoch, validate
from .state import TrainState
from .trainer import Trainer, learning_rate, param_groups

__all__ = [
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "Trainer",
    "fit",
    "learning_rate",
    "load_train_config",
    "param_groups",
    "parse_overrides",
    "train_one_epoch",
    "validate",
]
