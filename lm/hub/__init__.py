"""The Hugging Face format: `export` writes a trained checkpoint as a directory that `transformers` loads
(families.py: the native classes; remote/: the custom code for the rest; tokenizer.py; card.py), and
`load.read_export` reads such a directory back as transformer-lm weights (docs/export.md)."""
