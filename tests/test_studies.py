"""The study layer: study configs, one-command studies that write their report, compare.py, launchers, Optuna."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf
from test_train import TINY, run_train

from lm.report import load_sweep, sweep_table, write_report

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import _common  # noqa: E402,F401  (registers the run-name resolvers the configs use)

STUDIES = {
    "pe_study": ("pos_encoding", ["learned", "sinusoidal", "rope", "alibi", "none"]),
    "optimizer_study": ("optimizer", ["adamw", "adafactor", "muon"]),
    "init_study": ("model.init", ["gpt2", "pytorch", "xavier"]),
    "scaling_study": ("model", ["tiny", "mini", "small", "base"]),
}
# a study shrunk to seconds: tiny model, a few steps, part of the validation split
SHRINK = [*TINY, "trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.limit_val_batches=3"]


def composed(*overrides: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("study", STUDIES)
def test_each_study_composes_as_a_multirun_over_three_seeds(study):
    key, values = STUDIES[study]
    cfg = composed(f"experiment={study}")
    assert cfg.hydra.mode == RunMode.MULTIRUN, "one command, no -m needed"
    params = cfg.hydra.sweeper.params
    assert params[key].split(",") == values and params["seed"] == "1,2,3"
    assert list(cfg.final_eval.context_multiples) == [1, 2, 4]
    assert f"/multirun/{study}/" in cfg.hydra.sweep.dir
    assert cfg.study_name == study and "compare.WriteReport" in cfg.hydra.callbacks.write_report._target_


@pytest.mark.parametrize(
    ("study", "choice", "lr"), [("optimizer_study", "adafactor", 8e-2), ("scaling_study", "base", 2e-3)]
)
def test_studies_pick_each_jobs_learning_rate_by_its_choice(study, choice, lr):
    group = "optimizer" if study == "optimizer_study" else "model"
    cfg = composed(f"experiment={study}", f"{group}={choice}")
    HydraConfig.instance().set_config(cfg)  # what a job sees: its own choices
    assert OmegaConf.select(cfg, "optimizer.lr") == lr


def test_optuna_search_composes_with_a_seeded_sampler_and_log_scale_lr():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = composed("hparams_search=optuna_lr")
    sweeper = cfg.hydra.sweeper
    assert "OptunaSweeper" in sweeper._target_ and sweeper.direction == "minimize"
    assert sweeper.sampler.seed == 1337 and sweeper.params["optimizer.lr"].startswith("tag(log")
    assert "optimizer.weight_decay" in sweeper.params


def test_a_study_is_one_command_that_ends_with_its_report(tmp_path, corpus):
    # init_study with two seeds instead of three: 3 configurations x 2 seeds, then compare.py by itself
    result = run_train(
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
    compared = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "compare.py"), str(sweep)], capture_output=True, text=True
    )
    assert compared.returncode == 0, compared.stderr
    report = (sweep / "results.md").read_text()
    assert re.search(r"\| model.init=gpt2 \| [0-9.]+M \| 2 of 3 \|", report)
    assert "`6_model.init-gpt2+seed-3` (failed): The training loss became nan" in report
    assert "`7_model.init-xavier+seed-3` (incomplete)" in report


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
    written = write_report(tmp_path)
    assert "scaling.png" in written and written["scaling.png"].stat().st_size > 0
    # learned positions add a few parameters: not a change of model size, no scaling plot
    same_size = tmp_path / "pe"
    for i, n in enumerate([800_000, 816_000]):
        job = same_size / f"{i}_pos-{i}"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"pos_encoding=p{i}", "seed=1"]))
        summary = {"status": "finished", "parameters": n, "seq_length": 128, "metrics": {"val/loss": 1.8}}
        (job / "summary.json").write_text(json.dumps(summary))
    assert "scaling.png" not in write_report(same_size)
    assert [j.label for j in load_sweep(tmp_path)][:2] == ["model=size0", "model=size0"]
    assert "n/a" in (tmp_path / "results.md").read_text()  # no 4x evaluation in these summaries


def test_compare_names_a_missing_sweep_dir(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "compare.py"), str(tmp_path / "nope")], capture_output=True, text=True
    )
    assert result.returncode == 1 and result.stderr.startswith("error:") and "is not a directory" in result.stderr


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


def test_optuna_search_survives_a_failed_trial(tmp_path, corpus):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    # n_head=3 does not divide n_embd=32: those trials fail with a config error, and the search goes on
    result = run_train(
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
