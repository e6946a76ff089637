"""Training callbacks, one concern a file; conf/callbacks/ names them as `lm.callbacks.<Class>`.

- validation: `ValidateAtEnd` (every run ends with a full validation pass), `ValidationCost` (what they cost),
  `ValidationLog` (their results in train.log)
- checkpoints: `LatestCheckpoint` (last.ckpt), `SaveOnInterrupt` (a checkpoint on SIGINT/SIGTERM)
- speed: `LMThroughputMonitor` (tokens/s, MFU), `CompileTime`
- progress: `ResumableProgressBar`
- text_sample: `TextSample`
- ema: `EMAWeights` (an average of the weights, which validation, checkpoints and the final model use)
"""

from lm.callbacks.checkpoints import InterruptedTraining, LatestCheckpoint, SaveOnInterrupt
from lm.callbacks.ema import EMAWeights
from lm.callbacks.progress import ResumableProgressBar
from lm.callbacks.speed import CompileTime, LMThroughputMonitor
from lm.callbacks.text_sample import TextSample
from lm.callbacks.validation import ValidateAtEnd, ValidationCost, ValidationLog

__all__ = [
    "CompileTime",
    "EMAWeights",
    "InterruptedTraining",
    "LMThroughputMonitor",
    "LatestCheckpoint",
    "ResumableProgressBar",
    "SaveOnInterrupt",
    "TextSample",
    "ValidateAtEnd",
    "ValidationCost",
    "ValidationLog",
]
