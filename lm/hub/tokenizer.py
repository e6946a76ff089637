"""The character vocabulary as a `tokenizers` tokenizer that `AutoTokenizer` loads: one token per character.

Text is split into single characters (newlines and spaces included, no normalisation, no special tokens), each
looked up in a word-level vocabulary of the model's characters, and decoded by joining them again, so
decode(encode(text)) == text. A character outside the vocabulary is an error from `tokenizers` ("WordLevel error:
Missing [UNK] token from the vocabulary"), never a silent replacement. A byte-level model's (data.encoding=bytes)
tokens are bytes: GPT-2's byte-to-character table turns any text into them and back.
"""

from __future__ import annotations

EVERY_CHARACTER = r"[\s\S]"  # one character per token; "." would miss newlines


def byte_characters() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte value (what `tokenizers`' ByteLevel pre-tokenizer emits)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    stand_ins, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            stand_ins[byte] = chr(byte)
        else:
            stand_ins[byte] = chr(256 + extra)
            extra += 1
    return stand_ins


def build_tokenizer(vocab: str, byte_level: bool = False, max_length: int | None = None):
    """A `transformers` fast tokenizer whose ids are `CharTokenizer(vocab, byte_level)`'s."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    split = pre_tokenizers.Split(Regex(EVERY_CHARACTER), behavior="isolated")
    if byte_level:  # our symbols are the bytes' latin-1 characters; ByteLevel's are GPT-2's stand-ins for them
        stand_ins = byte_characters()
        tokenizer = Tokenizer(models.WordLevel({stand_ins[ord(c)]: i for i, c in enumerate(vocab)}))
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False), split]
        )
        tokenizer.decoder = decoders.ByteLevel()
    else:
        tokenizer = Tokenizer(models.WordLevel({c: i for i, c in enumerate(vocab)}))
        tokenizer.pre_tokenizer = split
        tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        clean_up_tokenization_spaces=False,  # it would remove the space before punctuation
        model_max_length=max_length,
    )
