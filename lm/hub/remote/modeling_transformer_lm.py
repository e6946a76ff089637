"""transformer-lm's Transformer as a `transformers` causal LM, for configurations no native class computes (ALiBi,
T5, FIRE, xPos, post-LN, soft-capped logits, sliding windows, RoPE's context extensions, ...).

The forward pass is lm/model.py's own, copied beside the weights: the export and the model that trained cannot
drift apart. There is no KV cache here: each generated character reads the whole text again, which is cheap at a
character model's size; transformer-lm's own generate.py has the cache.
"""

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from lm.hub.remote.configuration_transformer_lm import TransformerLMConfig
from lm.model import Transformer, TransformerConfig


class TransformerLMForCausalLM(PreTrainedModel, GenerationMixin):
    """A `transformers` wrapper around `Transformer`, whose weights sit under `model.` as in a training checkpoint."""

    config_class = TransformerLMConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]

    def __init__(self, config: TransformerLMConfig):
        super().__init__(config)
        self.model = Transformer(TransformerConfig(**config.model_config))
        if self.model.config.tie_embeddings:  # the head is the token embedding's matrix, stored once
            self._tied_weights_keys = {"model.head.weight": "model.token_embedding.weight"}
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        # from_pretrained builds the model on the meta device, loads the weights and leaves the computed buffers
        # (RoPE's tables, ALiBi's slopes, the sinusoidal table) empty: they are recomputed here, nothing else
        buffers = dict(module.named_buffers(recurse=False))
        if not buffers:
            return
        with torch.device("cpu"):
            fresh = Transformer(TransformerConfig(**self.config.model_config))
        prefix = next(name for name, candidate in self.named_modules() if candidate is module)
        fresh_buffers = dict(fresh.named_buffers())
        for name, buffer in buffers.items():
            key = f"{prefix}.{name}".removeprefix("model.")
            buffer.copy_(fresh_buffers[key].to(buffer.device, buffer.dtype))

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.token_embedding

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.token_embedding = value

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.head

    def set_output_embeddings(self, value: torch.nn.Module) -> None:
        self.model.head = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits (B, T, vocab) and, with `labels` (the inputs, -100 where ignored), the mean next-character loss."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("transformer-lm models read unpadded text: pass prompts of one length, or one at a time.")
        logits = self.model(input_ids)
        loss = None
        if labels is not None:
            shifted = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
            loss = F.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, attention_mask=None, **kwargs) -> dict:
        # no KV cache: each step reads the last seq_length characters again, as transformer-lm's generate.py does
        # with kv_cache=false
        input_ids = input_ids[:, -self.model.config.seq_length :]
        attention_mask = None if attention_mask is None else attention_mask[:, -input_ids.shape[1] :]
        return {"input_ids": input_ids, "attention_mask": attention_mask}
