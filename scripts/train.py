"""Train a character-level Transformer LM. Configuration: conf/train.yaml (the groups: README, docs/configuration.md).

python scripts/train.py                                   # the machine's recipe (conf/recipes.yaml), ~5 minutes
python scripts/train.py pos_encoding=rope optimizer=adafactor
python scripts/train.py -m pos_encoding=learned,sinusoidal,rope
python scripts/train.py resume=outputs/runs/<run>

The run itself is `lm.train.run`.
"""

import sys

import hydra
from omegaconf import DictConfig

from lm.cli import command_line
from lm.config import CONFIG_DIR
from lm.train import run


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    return run(cfg)


if __name__ == "__main__":
    sys.argv = command_line("train", sys.argv)
    main()
