"""Loss, perplexity and bits per character of a checkpoint, at one or several context lengths.

    python scripts/evaluate.py ckpt=outputs/runs/<run>/
    python scripts/evaluate.py ckpt=outputs/runs/<run>/ context_lengths=[64,128,256,512]
    python scripts/evaluate.py ckpt=path/to/best.ckpt data.path=other_text.txt
    python scripts/evaluate.py ckpt=outputs/runs/<run>/ past_context=1000     # + predictions past the context
    python scripts/evaluate.py ckpt=outputs/runs/<run>/ split=test            # the test split (enwik8, text8)

Prints a Markdown table and writes it, with a JSON copy, next to the checkpoint. The work is
`lm.commands.evaluate_checkpoint`.
"""

import sys

import hydra
from omegaconf import DictConfig

from lm.cli import command_line
from lm.commands import evaluate_checkpoint
from lm.config import CONFIG_DIR
from lm.console import report_errors


@hydra.main(config_path=CONFIG_DIR, config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    report_errors(evaluate_checkpoint)(cfg)


if __name__ == "__main__":
    sys.argv = command_line("evaluate", sys.argv)
    main()
