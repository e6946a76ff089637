"""transformer-lm: a character-level Transformer language model.

The plain-Python API: `load_model(path)` returns a trained model and its tokenizer, and `generate(...)` samples
from it. Training is `lm.train.train(cfg)` (Lightning: `lm.module`, `lm.data`), driven by `scripts/train.py`
(Hydra). docs/architecture.md shows how the package is laid out.
"""

from lm.checkpoint import load_model
from lm.generate import generate
from lm.model import Transformer, TransformerConfig
from lm.tokenizer import CharTokenizer

__all__ = ["CharTokenizer", "Transformer", "TransformerConfig", "generate", "load_model"]
