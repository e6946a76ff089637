"""Every value of every config group composes with the rest and instantiates."""

import pytest
import torch
from helpers import ROOT
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

import lm.config  # noqa: F401  (registers the resolvers the configs use)
from lm.model import Transformer, TransformerConfig
from lm.optim import parameter_groups

GROUPS = {
    group: sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))
    for group in (
        "data",
        "model",
        "pos_encoding",
        "optimizer",
        "trainer",
        "logger",
        "callbacks",
        "paths",
        "debug",
        "experiment",
        "hparams_search",
    )
}


def compose_train(tmp_path, overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    OmegaConf.set_readonly(cfg.hydra, False)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
        cfg.paths.data_dir = str(tmp_path / "data")
    HydraConfig.instance().set_config(cfg)  # for ${hydra:...} interpolations
    with open_dict(cfg):
        del cfg.hydra
    return cfg


def test_every_group_has_options():
    for group, options in GROUPS.items():
        assert options, f"conf/{group} has no options"


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_group_option_composes_and_instantiates(group, option, tmp_path, corpus):
    overrides = [f"{group}={option}", f"data.path={corpus}"]
    if group == "data" and option in ("enwik8", "text8"):  # their splits are 90 M / 5 M / 5 M characters
        overrides.append("data.split_sizes=[4000,1000,1000]")
    cfg = compose_train(tmp_path, overrides)
    OmegaConf.resolve(cfg)
    datamodule = instantiate(cfg.data)
    model_cfg = OmegaConf.to_container(cfg.model)
    model_cfg.pop("compile")
    model = Transformer(TransformerConfig(vocab_size=datamodule.tokenizer.vocab_size, **model_cfg))
    optimizer = instantiate(cfg.optimizer)(parameter_groups(model))
    assert isinstance(optimizer, torch.optim.Optimizer)
    for name, logger_cfg in cfg.logger.items():
        if name == "wandb":
            pytest.importorskip("wandb")
        assert instantiate(logger_cfg) is not None
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    trainer_cfg = OmegaConf.to_container(cfg.trainer)
    trainer_cfg["precision"] = "32-true" if trainer_cfg["precision"] == "auto" else trainer_cfg["precision"]
    if trainer_cfg.get("strategy", "").startswith("ddp"):
        trainer_cfg["devices"] = 1  # constructing a 2-process trainer is covered by the DDP test
    trainer = instantiate(trainer_cfg, logger=False, callbacks=callbacks)
    assert trainer.max_steps != 0


def test_pos_encoding_lands_under_the_model(tmp_path):
    cfg = compose_train(tmp_path, ["pos_encoding=rope", "model.pos_encoding.base=500"])
    assert cfg.model.pos_encoding.name == "rope" and cfg.model.pos_encoding.base == 500
    cfg = compose_train(tmp_path, ["pos_encoding=learned", "model=base"])
    assert cfg.model.pos_encoding.name == "learned" and cfg.model.n_layer == 6


def test_optimizers_have_their_own_learning_rates(tmp_path):
    adamw = compose_train(tmp_path, ["optimizer=adamw"]).optimizer.lr
    adafactor = compose_train(tmp_path, ["optimizer=adafactor"]).optimizer.lr
    assert adafactor > 3 * adamw


@pytest.mark.parametrize(
    "overrides",
    ["callbacks.text_sample.prompt-'Café ☃'+model-tiny", "final_eval.context_multiples-[1,2]+data.path-a b"],
)
def test_a_run_directory_name_can_be_passed_back_as_a_hydra_value(overrides):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from lm.naming import short_name

    name = short_name(overrides)
    (parsed,) = OverridesParser.create().parse_overrides([f"ckpt=outputs/runs/2026-11-27_10-00-00_{name}"])
    assert parsed.value() == f"outputs/runs/2026-11-27_10-00-00_{name}"  # one string, not a list or a sweep
    assert "/" not in name and name.count("+") == 1


def test_a_long_run_name_keeps_what_you_typed_first_and_cuts_only_between_items(monkeypatch):
    from lm.naming import RECIPE_KEYS, short_name

    recipe = "data.batch_size-8+lr_schedule.warmup_steps-30+model-mini+optimizer-muon+optimizer.lr-1e-2"
    overrides = f"{recipe}+trainer.max_steps-200+trainer.val_check_interval-1000"
    monkeypatch.setenv(RECIPE_KEYS, "model,optimizer,optimizer.lr,data.batch_size,lr_schedule.warmup_steps")
    name = short_name(overrides)
    assert name.startswith("trainer.max_steps-200+trainer.val_check_interval-1000+model-mini+optimizer-muon+")
    kept, digest = name.split("..")
    assert len(name) <= 120 and len(digest) == 8
    assert set(kept.split("+")) <= set(overrides.split("+")), "every item kept whole"
    monkeypatch.setenv(RECIPE_KEYS, "")
    assert short_name("trainer.max_steps-20+model-tiny") == "model-tiny+trainer.max_steps-20"  # short: unchanged


def test_a_cut_name_keeps_what_changes_the_model_before_data_and_schedule_settings():
    from lm.naming import short_name

    # what Hydra passes: its override_dirname, sorted by key
    overrides = (
        "data.batch_size-8+data.seq_length-64+lr_schedule.warmup_steps-10+model.mlp-swiglu+model.norm-rmsnorm"
        "+model.qk_norm-true+optimizer.lr-0.002+pos_encoding-learned+trainer.max_steps-600"
    )
    name = short_name(overrides)
    assert name.startswith("pos_encoding-learned+model.mlp-swiglu+model.norm-rmsnorm+model.qk_norm-true+optimizer.lr")
    assert ".." in name and "trainer.max_steps" not in name


def test_the_machines_recipe_comes_after_your_own_settings_in_the_run_name(tmp_path, corpus, cli):
    cli.train([f"data.path={corpus}", "trainer.max_steps=2", "callbacks.throughput.peak_flops=null"], tmp_path)
    (run,) = (tmp_path / "outputs" / "runs").iterdir()
    name = run.name.split("_", 2)[2]  # after the date and time
    assert name.startswith("trainer.max_steps-2+callbacks.throughput.peak_flops-null+model-mini+optimizer-muon+")
    assert ".." in name and name.split("..")[0].split("+")[-1].count("-") >= 1
    assert "model=mini" in (run / ".hydra" / "overrides.yaml").read_text()
