"""The standalone trainer: `cptfast.train(config)` and `cptfast train CONFIG.toml`.

(The package is `training`, so that `cptfast.train` stays the function.)
"""

from cptfast.training.callbacks import Callback
from cptfast.training.config import Config, load
from cptfast.training.loop import NonFiniteLossError, StepResult, Trainer, TrainResult, train

__all__ = ["Callback", "Config", "NonFiniteLossError", "StepResult", "Trainer", "TrainResult",
           "load", "train"]
