"""The standalone trainer: `cptfast.train(config)` and `cptfast train CONFIG.toml`.

(The package is `training`, so that `cptfast.train` stays the function.)
"""

from cptfast.training.config import Config, load
from cptfast.training.loop import NonFiniteLossError, TrainResult, train

__all__ = ["Config", "NonFiniteLossError", "TrainResult", "load", "train"]
