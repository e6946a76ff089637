"""The `transformers` config of transformer-lm's custom export: lm.model.TransformerConfig's fields as a dict."""

from transformers import PreTrainedConfig


class TransformerLMConfig(PreTrainedConfig):
    """`model_config` holds the fields of transformer-lm's `TransformerConfig` (lm/model.py), which builds the model."""

    model_type = "transformer_lm"

    model_config: dict | None = None
    vocab_size: int | None = None
    tie_word_embeddings: bool = True
