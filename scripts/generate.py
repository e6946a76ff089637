"""Sample text from a trained checkpoint, streaming characters to stdout as they are made.

    python scripts/generate.py ckpt=outputs/runs/<run>/ prompt="KING: Oh God !" max_new_tokens=200
    python scripts/generate.py ckpt=path/to/best.ckpt temperature=0 kv_cache=false

stdout carries the text alone; diagnostics go to stderr. The work is `lm.commands.generate_text`.
"""

import sys

import hydra
from omegaconf import DictConfig

from lm.cli import command_line
from lm.commands import generate_text
from lm.config import CONFIG_DIR
from lm.console import report_errors


@hydra.main(config_path=CONFIG_DIR, config_name="generate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    report_errors(generate_text)(cfg)


if __name__ == "__main__":
    sys.argv = command_line("generate", sys.argv)
    main()
