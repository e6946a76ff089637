"""Export a trained checkpoint as a Hugging Face model directory: safetensors weights, config, generation config,
the character tokenizer and a model card, loadable offline with `transformers`' from_pretrained.

    python scripts/export.py ckpt=outputs/runs/<run>/ out=exported

It needs the optional packages: pip install -e ".[hf]". The work is `lm.commands.export_model` (docs/export.md).
"""

import sys

import hydra
from omegaconf import DictConfig

from lm.cli import command_line
from lm.commands import export_model
from lm.config import CONFIG_DIR
from lm.console import report_errors


@hydra.main(config_path=CONFIG_DIR, config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    report_errors(export_model)(cfg)


if __name__ == "__main__":
    sys.argv = command_line("export", sys.argv)
    main()
