"""The study layer: study configs, one-command studies that write their report, compare.py, launchers, Optuna."""

import csv
import json
import os
import re
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, TINY, run_script, run_train
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

import lm.config  # noqa: F401  (registers the resolvers the configs use)
from lm.cli import machine_recipes
from lm.report import load_sweep, sweep_table, write_sweep_report

STUDIES = {  # what each varies, and the multiples of its context the final model is read at
    "pe_study": ("pos_encoding", ["learned", "sinusoidal", "rope", "alibi", "none"], [1, 2, 4]),
    "optimizer_study": ("optimizer", ["adamw", "adafactor", "muon"], [1, 2, 4]),
    "init_study": ("model.init", ["gpt2", "pytorch", "xavier"], [1, 2, 4]),
    "scaling_study": ("rung", ["w32", "w64", "w96", "w128", "w160"], [1]),
    "context_study": ("data.seq_length", ["64", "128", "256", "512"], [1, 2]),
    "data_study": ("data.train_fraction", ["0.125", "0.25", "0.5", "1.0"], [1]),
    "length_study": (
        "length_arm",
        "learned,sinusoidal,rope,alibi,none,t5,xpos,fire,rope_quarter,rope_half,rope_base500,rope_base500k,gqa1,gqa2,"
        "window,window_sinks,rope_finetune_linear,rope_finetune_yarn".split(","),
        [1, 2, 4, 8],
    ),
}
# a study shrunk to seconds: tiny model, a few steps, part of the validation split
SHRINK = [*TINY, "trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.limit_val_batches=3"]


def composed(*overrides: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("study", STUDIES)
def test_each_study_composes_as_a_multirun_over_three_seeds(study):
    key, values, multiples = STUDIES[study]
    cfg = composed(f"experiment={study}")
    assert cfg.hydra.mode == RunMode.MULTIRUN, "one command, no -m needed"
    params = cfg.hydra.sweeper.params
    assert params[key].split(",") == values and params["seed"] == "1,2,3"
    assert list(cfg.final_eval.context_multiples) == multiples
    assert f"/multirun/{study}/" in cfg.hydra.sweep.dir
    assert cfg.study_name == study and "lm.commands.WriteReport" == cfg.hydra.callbacks.write_report._target_
    # the CPU budget unless a study says otherwise: `mini`'s shape, 16 x 128 characters a step, AdamW
    assert cfg.data.batch_size * cfg.data.seq_length == 2048 and cfg.optimizer._target_ == "torch.optim.AdamW"


def test_studies_pick_each_jobs_learning_rate_by_its_choice():
    cfg = composed("experiment=optimizer_study", "optimizer=adafactor")
    HydraConfig.instance().set_config(cfg)  # what a job sees: its own choices
    assert OmegaConf.select(cfg, "optimizer.lr") == 8e-2


def test_the_scaling_ladder_spans_30x_in_parameters_with_lr_times_width_constant():
    from lm.model import Transformer, TransformerConfig

    sizes, products = [], []
    for rung in STUDIES["scaling_study"][1]:
        cfg = composed("experiment=scaling_study", f"rung={rung}")
        model = cfg.model
        assert model.n_embd == model.n_head * 32 and model.dropout == 0.0
        config = TransformerConfig(vocab_size=65, **{k: v for k, v in model.items() if k != "compile"})
        sizes.append(Transformer(config).num_parameters())
        products.append(cfg.optimizer.lr * model.n_embd)
    assert sizes == sorted(sizes) and sizes[-1] / sizes[0] >= 30
    assert products == pytest.approx([8e-3 * 128] * len(products), rel=1e-3), "the rule: lr = 8e-3 x 128 / width"


@pytest.mark.parametrize("budget", ["cpu", "gpu"])
def test_each_length_arm_builds_the_model_it_names(budget):
    from lm.model import POSITIONAL_ENCODINGS, Transformer, TransformerConfig

    expected = {
        "rope_quarter": ("rope", lambda c: c.pos_encoding.rotary_fraction == 0.25),
        "rope_base500k": ("rope", lambda c: c.pos_encoding.base == 500_000),
        "gqa1": ("rope", lambda c: c.kv_heads == 1),
        "window": ("rope", lambda c: c.attention_window == c.seq_length // 2 and c.attention_sinks == 0),
        "window_sinks": ("rope", lambda c: c.attention_window == c.seq_length // 2 and c.attention_sinks == 4),
        "fire": ("fire", lambda c: c.kv_heads == c.n_head and c.attention_window is None),
        # fine-tuned at twice the budget's length from the rope arm's model, Position Interpolation by 2
        "rope_finetune_linear": (
            "rope",
            lambda c: (
                (c.pos_encoding.scaling, c.pos_encoding.scaling_factor, c.seq_length)
                == ("linear", 2.0, 2 * c.pos_encoding.original_length)
            ),
        ),
    }
    for arm in STUDIES["length_study"][1]:
        cfg = composed("experiment=length_study", f"study={budget}", f"length_arm={arm}")
        model = OmegaConf.to_container(cfg.model, resolve=True)
        config = TransformerConfig(vocab_size=65, **{k: v for k, v in model.items() if k != "compile"})
        Transformer(config)
        name, check = expected.get(arm, (arm if arm in POSITIONAL_ENCODINGS else "rope", lambda c: True))
        assert config.pos_encoding.name == name and check(config), arm
        # the rope arm alone is also read with each context extension; the fine-tuned arms at the budget's lengths
        assert bool(cfg.final_eval.rope_scalings) == (arm == "rope")
        if arm.startswith("rope_finetune"):
            assert cfg.final_eval.base_length == cfg.study_length and cfg.trainer.max_steps == 100
            assert str(OmegaConf.to_container(cfg)["init_from"]) == "${lm_sweep_job:'length_arm=rope'}"


def test_the_length_report_gives_each_arm_and_extension_its_loss_against_context_with_standard_errors(tmp_path):
    for i, (arm, seed) in enumerate((a, s) for a in ("rope", "alibi", "learned") for s in (1, 2, 3)):
        job = tmp_path / f"{i}_length_arm-{arm}+seed-{seed}"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"length_arm={arm}", f"seed={seed}"]))
        loss = {"rope": 1.7, "alibi": 1.8, "learned": 1.75}[arm] + 0.01 * seed
        summary = {"status": "finished", "parameters": 800_000, "seq_length": 128, "fit_seconds": 10.0}
        summary["metrics"] = {"val/loss": loss, "val/bpc": loss / 0.693, "val/best_loss": loss}
        summary["evaluations"] = [
            {"context_length": 128 * m, "loss": None if arm == "learned" and m > 1 else loss + 0.1 * (m - 1), "bpc": 0}
            for m in (1, 2, 4, 8)
        ]
        if arm == "rope":
            summary["scaled_evaluations"] = {
                "yarn": [{"context_length": 128 * m, "loss": loss + 0.01 * m, "bpc": 0} for m in (2, 4, 8)]
            }
        (job / "summary.json").write_text(json.dumps(summary))
    written = write_sweep_report(tmp_path)
    assert written["length.png"].stat().st_size > 0
    report = (tmp_path / "results.md").read_text()
    rows = {line.split(" | ")[0][2:]: line for line in report.splitlines() if line.startswith("| length_arm=")}
    # mean over seeds 1-3 and its standard error, sd / sqrt(3) = 0.01 / sqrt(3)
    assert "| 3 | 1.7200 ± 0.0058 | 1.8200 ± 0.0058 | 2.0200 ± 0.0058 | 2.4200 ± 0.0058 |" in rows["length_arm=rope"]
    assert "| 1.7200 ± 0.0058 | 1.7400 ± 0.0058 | 1.7600 ± 0.0058 | 1.8000 ± 0.0058 |" in rows["length_arm=rope + yarn"]
    assert rows["length_arm=learned"].endswith("| n/a | n/a | n/a |")
    assert "8x (1024)" in report and "loss @8x ctx" in report


def test_the_context_study_keeps_the_characters_per_step():
    for length in STUDIES["context_study"][1]:
        cfg = composed("experiment=context_study", f"data.seq_length={length}")
        assert cfg.data.batch_size * cfg.data.seq_length == cfg.tokens_per_step == 2048
    assert set(composed("experiment=context_study").hydra.sweeper.params.pos_encoding.split(",")) >= {"rope", "alibi"}
    gpu = composed("experiment=context_study", "study=gpu", "data.seq_length=512")
    assert gpu.data.batch_size * 512 == gpu.tokens_per_step == 64 * 256


def test_the_data_study_measures_the_training_data_it_saw():
    cfg = composed("experiment=data_study")
    assert cfg.final_eval.train_split is True and cfg.data.val_fraction == 0.1  # the validation split unchanged


@pytest.mark.parametrize("study", STUDIES)
def test_the_gpu_budget_composes_with_every_study(study):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    cfg = composed(f"experiment={study}", "study=gpu")
    assert cfg.hydra.sweeper.params[STUDIES[study][0]].split(",") == STUDIES[study][1], "the study's own sweep"
    assert cfg.model.compile == "auto" and cfg.tokens_per_step == 64 * 256
    own = {"context_study": 500, "data_study": 1000, "scaling_study": 1600, "length_study": 500}
    assert cfg.trainer.max_steps == own.get(study, 1500), "a study's own length"
    assert cfg.hydra.launcher.n_jobs == 3 and "Joblib" in cfg.hydra.launcher._target_
    if study in ("pe_study", "init_study"):  # nanoGPT's Shakespeare size and data, Muon at 1e-2
        assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.dropout) == (6, 384, 0.2)
        assert (cfg.data.batch_size, cfg.data.seq_length) == (64, 256)
        assert cfg.optimizer._target_ == "lm.optim.MuonWithAdamW" and cfg.optimizer.lr == 1e-2


@pytest.mark.parametrize("corpus_name", ["enwik8", "text8"])
def test_enwik8_and_text8_are_split_as_in_the_literature(corpus_name):
    data = composed(f"data={corpus_name}").data
    assert list(data.split_sizes) == [90_000_000, 5_000_000, 5_000_000] and data.size == 100_000_000
    assert data.url == f"https://mattmahoney.net/dc/{corpus_name}.zip" and data.archive_member == corpus_name
    assert len(data.sha256) == 64 and data.encoding == ("bytes" if corpus_name == "enwik8" else "utf-8")


def test_optuna_search_composes_with_a_seeded_sampler_and_log_scale_lr():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = composed("hparams_search=optuna_lr")
    sweeper = cfg.hydra.sweeper
    assert "OptunaSweeper" in sweeper._target_ and sweeper.direction == "minimize"
    assert sweeper.sampler.seed == 1337 and sweeper.params["optimizer.lr"].startswith("tag(log")
    assert "optimizer.weight_decay" in sweeper.params


def test_the_recipe_search_runs_at_the_default_runs_budget_over_the_recipes_settings():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = composed("hparams_search=optuna_recipe")
    sweeper = cfg.hydra.sweeper
    assert sweeper.direction == "minimize" and sweeper.n_jobs == 1 and sweeper.sampler.seed == 1337
    searched = {"model.n_layer", "model.n_embd", "data.batch_size", "data.seq_length", "optimizer.lr"}
    searched |= {"optimizer.embedding_lr", "lr_schedule.warmup_steps", "lr_schedule.min_lr_ratio"}
    assert set(sweeper.params) == searched
    # each trial is the five-minute run: the CPU recipe's settings, and no length of its own (default_time_budget)
    assert cfg.model.n_layer == 4 and cfg.model.n_embd == 128 and cfg.optimizer._target_ == "lm.optim.MuonWithAdamW"
    for key, value in machine_recipes()["cpu"].items():  # every other setting of the recipe, as the recipe has it
        if key not in ("model", "optimizer"):
            assert float(OmegaConf.select(cfg, key)) == float(value), key
    assert cfg.trainer.get("max_steps", -1) in (-1, None) and cfg.trainer.get("max_time") is None
    assert cfg.get("study") is None


def test_the_recipe_search_trains_its_trials_and_reports_the_best(tmp_path, corpus, cli):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    # the search's own space, shrunk to seconds: a few steps of tiny sizes
    small = ["model.n_layer=choice(1,2)", "model.n_embd=choice(16,32)", "model.n_head=2"]
    small += ["data.seq_length=choice(16,32)", "data.batch_size=choice(2,4)", "callbacks.text_sample.max_new_tokens=0"]
    steps = ["trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.limit_val_batches=3"]
    search = [f"data.path={corpus}", "hparams_search=optuna_recipe", "hydra.sweeper.n_trials=2"]
    cli.train([*search, *small, *steps], tmp_path)
    sweep = next((tmp_path / "outputs" / "multirun" / "optuna_recipe").iterdir())
    summaries = [json.loads(p.read_text()) for p in sweep.glob("*/summary.json")]
    assert len(summaries) == 2 and all(s["status"] == "finished" and s["global_step"] == 6 for s in summaries)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == min(s["metrics"]["val/loss"] for s in summaries)
    assert {"optimizer.embedding_lr", "lr_schedule.warmup_steps", "model.n_embd"} <= set(best["best_params"])


def test_a_study_is_one_command_that_ends_with_its_report(tmp_path, corpus, cli):
    # init_study with two seeds instead of three: 3 configurations x 2 seeds, then compare.py by itself
    result = cli.train(
        [f"data.path={corpus}", "experiment=init_study", "debug=default", "hydra.sweeper.params.seed='1,2'"], tmp_path
    )
    sweep = next((tmp_path / "outputs" / "multirun" / "init_study").iterdir())
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    # named by what differs: not by the study, which names the sweep dir, nor by debug=, the same for every job
    assert jobs[:2] == ["0_seed-1+model.init-gpt2", "1_seed-2+model.init-gpt2"]
    assert len(jobs) == 6
    for name in ("results.md", "results.csv", "val_loss.png", "extrapolation.png"):
        assert (sweep / name).stat().st_size > 0, name
    assert not (sweep / "scaling.png").exists(), "one model size: no scaling plot"
    assert "| model.init=xavier |" in result.stdout  # the report is printed at the end

    rows = sweep_table(sweep)  # one call from a notebook
    assert [r["configuration"] for r in rows] == ["model.init=gpt2", "model.init=pytorch", "model.init=xavier"]
    for row in rows:
        assert row["seeds"] == 2 and row["val_loss_std"] is not None and row["val_loss_std"] > 0
        assert row["val_loss_2x"] and row["val_loss_4x"], "evaluated at 2x and 4x the context"
        assert row["tokens_per_s"] > 0 and row["wall_s"] > 0
    with open(sweep / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3 and float(table[0]["val_loss"]) == pytest.approx(rows[0]["val_loss"])

    # a job that failed and one still running are reported, not fatal
    def add_job(name: str, init: str) -> Path:
        overrides = yaml.safe_load((sweep / jobs[0] / ".hydra" / "overrides.yaml").read_text())
        overrides = [o for o in overrides if not o.startswith(("seed=", "model.init="))] + [
            f"model.init={init}",
            "seed=3",
        ]
        (sweep / name / ".hydra").mkdir(parents=True)
        (sweep / name / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        return sweep / name

    failed = add_job("6_model.init-gpt2+seed-3", "gpt2")
    (failed / "summary.json").write_text(json.dumps({"status": "failed", "error": "The training loss became nan"}))
    add_job("7_model.init-xavier+seed-3", "xavier")  # no summary.json: still running, or killed
    run_script("compare.py", str(sweep), in_process=True)
    report = (sweep / "results.md").read_text()
    assert re.search(r"\| model.init=gpt2 \| [0-9.]+M \| 2 of 3 \|", report)
    assert "`6_model.init-gpt2+seed-3`: failed: The training loss became nan" in report
    assert "`7_model.init-xavier+seed-3`: not started" in report  # nothing trained: no checkpoint, no logs


def test_every_job_of_a_study_titles_its_final_table_alike(tmp_path, corpus, cli):
    # learned positions cannot be read past their context; their jobs' tables say so, under the same heading
    sweep = ["hydra.sweeper.params={pos_encoding: 'learned,rope', seed: '1'}"]
    result = cli.train([f"data.path={corpus}", "experiment=pe_study", *SHRINK, *sweep], tmp_path)
    finals = re.findall(r"\[transformer-lm\] the final model:\n(.*)\n", result.stderr)
    assert finals == ["Validation split:", "Validation split:"], finals


def test_compare_fits_a_power_law_when_model_size_varies(tmp_path):
    # a synthetic sweep: four sizes x two seeds whose loss follows L = 5 N^-0.1
    for i, n in enumerate([30_000, 800_000, 3_200_000, 10_700_000]):
        for seed in (1, 2):
            job = tmp_path / f"{2 * i + seed - 1}_model-{i}+seed-{seed}"
            (job / ".hydra").mkdir(parents=True)
            (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"model=size{i}", f"seed={seed}"]))
            loss = 5 * n**-0.1 + 0.01 * seed
            summary = {"status": "finished", "parameters": n, "seq_length": 128, "fit_seconds": 10.0}
            summary["metrics"] = {"val/loss": loss, "val/bpc": loss / 0.693, "val/best_loss": loss}
            summary["evaluations"] = [{"context_length": 128 * m, "loss": loss, "bpc": loss / 0.693} for m in (1, 2)]
            (job / "summary.json").write_text(json.dumps(summary))
    written = write_sweep_report(tmp_path)
    assert "scaling.png" in written and written["scaling.png"].stat().st_size > 0
    # learned positions add a few parameters: not a change of model size, no scaling plot
    same_size = tmp_path / "pe"
    for i, n in enumerate([800_000, 816_000]):
        job = same_size / f"{i}_pos-{i}"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"pos_encoding=p{i}", "seed=1"]))
        summary = {"status": "finished", "parameters": n, "seq_length": 128, "metrics": {"val/loss": 1.8}}
        (job / "summary.json").write_text(json.dumps(summary))
    assert "scaling.png" not in write_sweep_report(same_size)
    assert [j.label for j in load_sweep(tmp_path)][:2] == ["model=size0", "model=size0"]
    assert "n/a" in (tmp_path / "results.md").read_text()  # no 4x evaluation in these summaries


def test_one_seed_has_no_standard_deviation_and_the_header_names_only_the_columns_there(tmp_path):
    for i, pe in enumerate(["rope", "alibi"]):
        job = tmp_path / f"{i}_pos_encoding-{pe}"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"pos_encoding={pe}", "seed=1"]))
        summary = {"status": "finished", "parameters": 800_000, "seq_length": 128, "fit_seconds": 10.0}
        summary["metrics"] = {"val/loss": 1.8 + i, "val/bpc": (1.8 + i) / 0.693, "val/best_loss": 1.8 + i}
        (job / "summary.json").write_text(json.dumps(summary))
    write_sweep_report(tmp_path)
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["val_loss"] for r in rows] == ["1.8", "2.8"] and [r["val_loss_std"] for r in rows] == ["", ""]
    report = (tmp_path / "results.md").read_text()
    assert "@2x" not in report and "@4x" not in report
    assert not [line for line in report.splitlines() if line.startswith("| ") and "±" in line]


def test_the_power_law_fit_recovers_its_exponent_and_an_honest_uncertainty():
    import numpy as np

    from lm.report import fit_power_law

    rng = np.random.default_rng(0)
    sizes = np.repeat([1e5, 3e5, 8e5, 1.5e6, 3.6e6], 3)
    losses = 6.0 * sizes**-0.12 * np.exp(rng.normal(0, 0.01, sizes.size))
    law = fit_power_law(sizes, losses)
    assert law.points == 15 and 0 < law.exponent_se < 0.02
    assert abs(law.exponent - 0.12) < 3 * law.exponent_se
    exact = fit_power_law(sizes, 6.0 * sizes**-0.12)
    assert exact.exponent == pytest.approx(0.12) and exact.a == pytest.approx(6.0) and exact.exponent_se < 1e-9


def test_the_frontier_is_the_lowest_loss_reached_with_at_most_so_many_flops():
    import numpy as np

    from lm.report import compute_frontier, frontier_handovers

    curves = {
        "small": (np.array([1.0, 2.0, 4.0, 8.0]), np.array([3.0, 2.5, 2.2, 2.1])),
        "large": (np.array([4.0, 8.0, 16.0, 32.0]), np.array([2.6, 2.15, 1.9, 1.7])),  # below 2.1 from 16 on
    }
    frontier = compute_frontier(curves)
    assert [label for *_, label in frontier] == ["small"] * 4 + ["large"] * 2
    assert all(a[1] > b[1] and a[0] < b[0] for a, b in zip(frontier, frontier[1:], strict=False)), "moves down"
    lines = frontier_handovers(curves)
    assert lines == [
        "small from 1 FLOPs (loss 3.0000)",
        "large from 16 FLOPs (loss 1.9000)",
        "the lowest loss, 1.7000, is large's, at 32 FLOPs",
    ]
    stuck = {"small": curves["small"], "large": (curves["large"][0], np.full(4, 2.5))}
    assert frontier_handovers(stuck)[1:] == ["the lowest loss, 2.1000, is small's, at 8 FLOPs"]
    # interleaved points: the frontier alternates, then settles; each size is named from its last stretch
    zigzag = {
        "a": (np.array([1.0, 3.0, 5.0]), np.array([3.0, 2.0, 1.95])),
        "b": (np.array([2.0, 4.0, 6.0]), np.array([2.5, 1.97, 1.5])),
    }
    assert frontier_handovers(zigzag)[:2] == [
        "a from 5 FLOPs (loss 1.9500), after first reaching it at 1",
        "b from 6 FLOPs (loss 1.5000), after first reaching it at 2",
    ]


def test_compare_fits_the_scaling_laws_exponent_and_draws_loss_against_flops(tmp_path):
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    # each size costs twice the last per step, and learns faster: its curve starts above the smaller one's at equal
    # FLOPs and ends below it
    for i, (n, flops) in enumerate([(100_000, 1e9), (400_000, 2e9), (1_600_000, 4e9)]):
        for seed in (1, 2):
            job = tmp_path / f"{2 * i + seed - 1}_rung-{i}+seed-{seed}"
            (job / ".hydra").mkdir(parents=True)
            (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"rung=r{i}", f"seed={seed}"]))
            writer = EventFileWriter(str(job))
            for step in range(100, 900, 100):
                loss = 1.2 + 2.0 * (step / 100) ** -(0.3 + 0.2 * i) * (1 + 0.01 * seed)
                summary = Summary(value=[Summary.Value(tag="val/loss", simple_value=loss)])
                writer.add_event(Event(step=step, wall_time=float(step), summary=summary))
            writer.close()
            summary = {"status": "finished", "parameters": n, "seq_length": 128, "flops_per_step": flops}
            summary["metrics"] = {"val/loss": loss, "val/bpc": loss / 0.693}
            (job / "summary.json").write_text(json.dumps(summary))
    written = write_sweep_report(tmp_path)
    assert {"scaling.png", "compute.png"} <= written.keys()
    report = (tmp_path / "results.md").read_text()
    assert re.search(r"L = [0-9.]+ N\^-\([0-9.]+ ± [0-9.]+\), by least squares in log-log over 6 jobs", report)
    # r1's curve interleaves with r0's from 6e11 and holds the frontier from 8e11; r2 from 2e12, to the end
    assert "- rung=r1 from 8e+11 FLOPs (loss 2.2150), after first reaching it at 6e+11" in report
    assert "- rung=r2 from 2e+12 FLOPs (loss 1.8580)\n- the lowest loss, 1.6735, is rung=r2's" in report


def test_the_data_study_reports_train_and_validation_loss_and_their_gap(tmp_path, corpus, cli):
    # a sweep on the command line replaces the study's own values for that key
    cli.train(
        [f"data.path={corpus}", "experiment=data_study", *SHRINK, "data.train_fraction=0.5,1.0", "seed=1"], tmp_path
    )
    sweep = next((tmp_path / "outputs" / "multirun" / "data_study").iterdir())
    rows = sweep_table(sweep)
    assert [r["configuration"] for r in rows] == ["data.train_fraction=0.5", "data.train_fraction=1.0"]
    for row in rows:
        assert row["train_loss"] > 0 and row["gap"] == pytest.approx(row["val_loss"] - row["train_loss"])
    report = (sweep / "results.md").read_text()
    assert "| train loss | val - train |" in report and "loss @2x ctx" not in report
    assert (sweep / "train_val.png").stat().st_size > 0
    final = json.loads(next(sweep.glob("0_*/final.eval.json")).read_text())
    assert final["train_results"][0]["tokens"] == final["results"][0]["tokens"], "as much training data as val"


def test_the_context_study_reads_each_model_at_its_length_and_twice_it(tmp_path, corpus, cli):
    cli.train(
        [
            f"data.path={corpus}",
            "experiment=context_study",
            *SHRINK,
            "data.seq_length=16,32",
            "pos_encoding=rope",
            "seed=1",
        ],
        tmp_path,
    )
    sweep = next((tmp_path / "outputs" / "multirun" / "context_study").iterdir())
    rows = sweep_table(sweep)
    assert [(r["context"], r["val_loss_2x"] is not None) for r in rows] == [(16, True), (32, True)]
    assert (sweep / "context.png").stat().st_size > 0


def test_compare_names_a_missing_sweep_dir(tmp_path, cli):
    result = cli.script("compare.py", str(tmp_path / "nope"), check=False)
    assert result.returncode == 1 and result.stderr.startswith("error:") and "is not a directory" in result.stderr


def test_compare_on_a_folder_that_is_not_a_sweep_writes_nothing_and_names_the_sweeps_below(tmp_path, cli):
    run = tmp_path / "runs" / "one_run"  # a single run's directory
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("- model=tiny\n")
    result = cli.script("compare.py", str(run), check=False)
    assert result.returncode == 1 and result.stderr.startswith("error:") and "holds no sweep's jobs" in result.stderr
    assert sorted(p.name for p in run.iterdir()) == [".hydra"]
    parent = tmp_path / "multirun" / "pe_study"  # the parent of dated sweeps
    for date in ("2026-01-01_00-00-00", "2026-01-02_00-00-00"):
        job = parent / date / "0_pos_encoding-rope"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text("- pos_encoding=rope\n")
        (parent / date / "multirun.yaml").write_text("hydra: {}\n")
    result = cli.script("compare.py", str(parent), check=False)
    assert result.returncode == 1 and "nothing was written" in result.stderr
    assert f"the sweeps below it: {parent / '2026-01-01_00-00-00'}, {parent / '2026-01-02_00-00-00'}" in result.stderr
    assert not (parent / "results.md").exists() and not (parent / "results.csv").exists()


def test_parallel_jobs_share_the_cores_instead_of_oversubscribing_them(tmp_path, corpus):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    run_train(
        ["-m", f"data.path={corpus}", *SHRINK, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=1,2"], tmp_path
    )
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "outputs" / "multirun").glob("*/*/summary.json")]
    assert len(summaries) == 2
    assert all(s["threads"] == max(1, (os.cpu_count() or 1) // 2) for s in summaries)


def test_submitit_local_runs_each_job_in_its_own_process(tmp_path, corpus):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    run_train(
        [
            "-m",
            f"data.path={corpus}",
            *SHRINK,
            "hydra/launcher=submitit_local",
            "hydra.launcher.cpus_per_task=1",
            "seed=1,2",
        ],
        tmp_path,
    )
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "outputs" / "multirun").glob("*/*/summary.json")]
    assert len(summaries) == 2 and all(s["status"] == "finished" and s["threads"] == 1 for s in summaries)


def test_optuna_search_survives_a_failed_trial(tmp_path, corpus, cli):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    # n_head=3 does not divide n_embd=32: those trials fail with a config error, and the search goes on
    result = cli.train(
        [
            f"data.path={corpus}",
            "hparams_search=optuna_lr",
            *SHRINK,
            "hydra.sweeper.n_trials=4",
            "model.n_head=choice(2,3)",
            "hydra.sweeper.sampler.seed=0",  # draws 2, 3, 2, 3 (the default seed's first four are all 3)
        ],
        tmp_path,
    )
    sweep = next((tmp_path / "outputs" / "multirun" / "optuna_lr").iterdir())
    statuses = sorted(json.loads(p.read_text())["status"] for p in sweep.glob("*/summary.json"))
    assert len(statuses) == 4 and "failed" in statuses and "finished" in statuses
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_params"]["model.n_head"] == 2 and best["best_value"] > 0
    assert "the sweep goes on" in result.stderr
    # the failed trials said why in their own line: not also Optuna's "Got 'None'" for each
    assert "Failed experiment" not in result.stdout + result.stderr
    # a trial's name and its row in the report give its sampled values to four significant digits; the job's
    # .hydra/overrides.yaml keeps them whole
    for job in (p for p in sweep.iterdir() if (p / ".hydra").is_dir()):
        lr = next(o for o in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) if "optimizer.lr=" in o)
        assert len(lr.split("=")[1]) > 10, lr  # the full value, as Optuna drew it
        for value in re.findall(r"\d+\.\d+(?:e-\d+)?", job.name):
            assert len(value.split("e")[0].replace(".", "").lstrip("0")) <= 4, job.name
    rows = list(csv.DictReader((sweep / "results.csv").open()))
    for row in rows:
        for value in re.findall(r"\d+\.\d+(?:e-\d+)?", row["configuration"]):
            assert len(value.split("e")[0].replace(".", "").lstrip("0")) <= 4, row["configuration"]


def test_an_optuna_search_starts_without_its_libraries_notices(tmp_path, corpus):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    # a process of its own: optuna's imports log only the first time, and its log level is its own
    args = [f"data.path={corpus}", "hparams_search=optuna_lr", *SHRINK, "hydra.sweeper.n_trials=1"]
    result = run_train(args, tmp_path)
    output = result.stdout + result.stderr
    assert "Study name: optuna_lr" in output
    assert "setup plugin" not in output and "A new study created" not in output, output[:2000]


def test_a_fine_tuned_arm_starts_from_its_own_seeds_rope_job_of_the_same_sweep(tmp_path):
    from omegaconf import open_dict

    cfg = composed("experiment=length_study", "length_arm=rope_finetune_yarn", "seed=2")
    with open_dict(cfg):
        cfg.hydra.sweep.dir = str(tmp_path)
        cfg.hydra.overrides.task = ["length_arm=rope_finetune_yarn", "seed=2", "experiment=length_study"]
    HydraConfig.instance().set_config(cfg)
    with pytest.raises(Exception, match="run that job first"):  # OmegaConf wraps the resolver's ConfigError
        _ = cfg.init_from
    for i, seed in enumerate([1, 2]):
        job = tmp_path / f"{i}_length_arm-rope+seed-{seed}"
        (job / ".hydra").mkdir(parents=True)
        (job / "checkpoints").mkdir()
        (job / "checkpoints" / "last.ckpt").touch()
        overrides = ["length_arm=rope", f"seed={seed}", "experiment=length_study", f"resume={tmp_path}"]
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    assert cfg.init_from == str(tmp_path / "1_length_arm-rope+seed-2" / "checkpoints" / "last.ckpt")
