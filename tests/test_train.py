"""End-to-end training through scripts/train.py, and a tiny model overfitting a tiny corpus."""

import re

import lightning as L
import pytest
import torch
from helpers import ROOT, TINY, custom_scalars_layout, hparams_of, make_corpus_text, run_train, scalars, text_samples

from lm.checkpoint import CHECKPOINT_KEY
from lm.data import CharDataModule
from lm.model import TransformerConfig
from lm.module import LanguageModel


def test_sweep_over_every_positional_encoding_and_optimizer(tmp_path, corpus, cli):
    cli.train(
        [
            "-m",
            f"data.path={corpus}",
            *TINY,
            "trainer.max_steps=12",
            "pos_encoding=learned,alibi,none",  # rope and sinusoidal: in every other run and in test_model.py
            "optimizer=adafactor,muon",  # adamw: the default
        ],
        tmp_path,
    )
    sweeps = list((tmp_path / "outputs" / "multirun").iterdir())
    assert len(sweeps) == 1, "all jobs share one sweep dir"
    runs = sorted(p for p in sweeps[0].iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(runs) == 6
    for run in runs:
        # TensorBoard's run list names each run by what differs between the jobs; .hydra/ keeps all overrides
        assert re.fullmatch(r"\d_optimizer-\w+\+pos_encoding-\w+", run.name), run.name
        assert "model=tiny" in (run / ".hydra" / "overrides.yaml").read_text()
        for ckpt in ("best.ckpt", "last.ckpt"):
            checkpoint = torch.load(run / "checkpoints" / ckpt, map_location="cpu", weights_only=True)
            assert checkpoint[CHECKPOINT_KEY]["vocab"] == "".join(sorted(set(corpus.read_text())))
        values = scalars(run)
        for tag in ("train/loss", "train/lr", "val/loss", "val/ppl", "val/bpc", "val/best_loss"):
            assert values.get(tag), f"{run.name} logged no {tag}"
        assert not [t for t in values if t == "epoch" or t.startswith(("lr-", "train/time", "train/batches"))]
        assert hparams_of(run)["optimizer.name"] in ("adafactor", "muon")
        # TensorBoard's Custom Scalars tab: validation first, then training, then speed; every chart's tag is logged
        layout = custom_scalars_layout(run)
        assert [tags[0] for _, tags in layout] == ["^val/loss$", "^train/loss$", "^speed/tokens_per_sec$"]
        assert layout[0][1][:2] == ["^val/loss$", "^val/bpc$"]
        # (12 steps are fewer than the throughput window: no speed/ series yet)
        assert {tag.strip("^$") for _, tags in layout for tag in tags} - set(values) <= {
            "speed/mfu",
            "speed/tokens_per_sec",
        }
        assert (run / "summary.json").is_file()
        # 12 steps < val_check_interval, yet the run ends with a full validation pass
        assert len(values["val/loss"]) == 1
        assert values["val/bpc"][-1] == pytest.approx(values["val/loss"][-1] / 0.6931471805599453, rel=1e-4)
        assert (run / "sample.txt").read_text()


# Lightning's notices that say nothing about a run of ours (each seen on a 30-step run before they were silenced)
LIGHTNING_NOTICES = (
    "IterableDataset",  # a caution about worker processes, which we do not use
    "LeafSpec",  # a deprecation inside Lightning
    "Tip:",  # an advertisement
    "`weights_only` was not set",  # once per checkpoint
    "is not supported by the model summary",  # bf16 CPUs
    "Total FLOPs",  # the model summary's column of zeros
    "GPU available:",
    "TPU available:",
    "LOCAL_RANK:",
    "Automatic Mixed Precision",
    "set_float32_matmul_precision",
    "exists and is not empty",  # on resume: the run's own checkpoint folder
    "Restoring states from",  # on resume: our own line says what is resumed
    "Restored all states",
    "smaller than the logging interval",  # a small corpus's epoch
)


def test_the_console_says_only_what_matters(tmp_path, corpus):
    result = run_train(
        [f"data.path={corpus}", *TINY, "trainer.max_steps=15", "trainer.val_check_interval=5"],
        tmp_path,
        python_warnings=None,  # as a user runs it
    )
    output = result.stdout + result.stderr
    assert not [notice for notice in LIGHTNING_NOTICES if notice in output]
    assert output.count("[transformer-lm] precision") == 1  # our start line: device, precision, length, size, dir
    assert "parameters, vocabulary of" in result.stderr
    assert "Epoch " in output and "val/loss=" in output  # the progress bar with the validation results
    assert "[transformer-lm] final val/best_loss=" in result.stderr and "----- sample after 15 steps" in result.stderr
    run = next((tmp_path / "outputs" / "runs").iterdir())
    assert len(scalars(run)["val/loss"]) == 3  # three validations, each with its checkpoints, said nothing
    # train.log holds what the console said, less the progress bar's redraws, plus each validation's results
    log = (run / "train.log").read_text()
    assert "\r" not in log and "\x1b" not in log and "Epoch " not in log
    assert log.count("[transformer-lm] precision") == 1 and "[transformer-lm] final val/best_loss=" in log
    assert [int(m) for m in re.findall(r"validation at step (\d+): .*val/loss=", log)] == [5, 10, 15]
    assert "----- sample after 15 steps" in log


def test_a_resumed_run_on_a_small_corpus_says_only_what_matters(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text(make_corpus_text(2000))  # 7 batches an epoch: fewer than the logging interval
    run_train([f"data.path={small}", *TINY, "trainer.max_steps=6"], tmp_path)
    run = next((tmp_path / "outputs" / "runs").iterdir())
    result = run_train([f"resume={run}", "trainer.max_steps=12"], tmp_path, python_warnings=None)  # as a user
    output = result.stdout + result.stderr
    assert not [notice for notice in LIGHTNING_NOTICES if notice in output], output[-3000:]
    assert f"[transformer-lm] resuming the run in {run} from step 6 (its checkpoints/last.ckpt)" in result.stderr


def test_training_by_epochs(tmp_path, corpus):
    result = run_train(
        [f"data.path={corpus}", *TINY, "logger=csv", "trainer.max_steps=-1", "trainer.max_epochs=2"],
        tmp_path,
        python_warnings=None,  # as a user runs it: Lightning's notices that do not concern our runs stay quiet
    )
    output = result.stdout + result.stderr
    assert not [notice for notice in LIGHTNING_NOTICES if notice in output]
    run = next((tmp_path / "outputs" / "runs").iterdir())
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    steps_per_epoch = (len(corpus.read_text()) - int(len(corpus.read_text()) * 0.1)) // (8 * 32)
    assert checkpoint["global_step"] == 2 * steps_per_epoch
    assert (run / "csv" / "metrics.csv").read_text().count("val/loss") == 1
    assert "val/loss=" in result.stderr


def test_time_budget_stops_training_after_a_final_validation(tmp_path, corpus, cli):
    result = cli.train(
        [f"data.path={corpus}", *TINY, "logger=csv", "trainer.max_steps=1000000", "trainer.max_time=00:00:00:03"],
        tmp_path,
    )
    run = next((tmp_path / "outputs" / "runs").iterdir())
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert 0 < checkpoint["global_step"] < 1000000
    assert (run / "csv" / "metrics.csv").read_text().count("val/loss") == 1
    assert "val/bpc=" in result.stderr


def test_tiny_model_overfits_a_tiny_repeated_corpus(tmp_path):
    path = tmp_path / "repeat.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    L.seed_everything(0, verbose=False)
    datamodule = CharDataModule(path=str(path), seq_length=32, batch_size=16, seed=0)
    config = TransformerConfig(
        vocab_size=datamodule.tokenizer.vocab_size, seq_length=32, n_layer=2, n_head=2, n_embd=32
    )
    module = LanguageModel(
        config,
        datamodule.tokenizer.vocab,
        optimizer=lambda groups: torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.0),
        warmup_steps=10,
    )
    trainer = L.Trainer(
        max_steps=150,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        val_check_interval=150,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        accelerator="cpu",
        precision="32-true",
    )
    batch = datamodule.train_dataloader().dataset.batch(0)
    with torch.no_grad():
        initial = float(module.loss(*batch))
    trainer.fit(module, datamodule=datamodule)
    with torch.no_grad():
        final = float(module.loss(*batch))
    assert initial > 2.5  # about ln(vocab size) at initialisation
    assert final < 0.3 and float(trainer.callback_metrics["val/loss"]) < 0.3


def test_bad_input_exits_with_one_clear_sentence(tmp_path):
    result = run_train([f"data.path={tmp_path / 'nope.txt'}", "model=tiny"], tmp_path, check=False)
    assert result.returncode == 1
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_gradients_are_clipped_with_the_fused_optimizer(precision):
    config = TransformerConfig(vocab_size=10, seq_length=8, n_layer=1, n_head=2, n_embd=8)
    module = LanguageModel(config, "".join(map(str, range(10))), optimizer=lambda g: torch.optim.AdamW(g, fused=True))
    module.trainer = L.Trainer(precision=precision, accelerator="cpu", logger=False, enable_progress_bar=False)
    for param in module.parameters():
        param.grad = torch.full_like(param, 100.0)
    module.configure_gradient_clipping(None, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    total = torch.nn.utils.get_total_norm([p.grad for p in module.parameters()])
    assert total == pytest.approx(1.0, rel=1e-4)


def test_a_corpus_without_newlines_trains_and_samples_from_its_own_text(tmp_path, cli):
    path = tmp_path / "dna.txt"
    rng = __import__("random").Random(0)
    path.write_text("".join(rng.choice("ACGT") for _ in range(6000)))  # one line, no newline anywhere
    result = cli.train([f"data.path={path}", *TINY, "trainer.max_steps=6"], tmp_path)
    assert "val/bpc=" in result.stderr and "warning" not in result.stderr
    # tqdm's bar whatever else is installed (Rich's, which optuna pulls in, draws nothing into a log file)
    assert re.search(r"\d+/\d+ \[", result.stdout), result.stdout[-500:]
    run = next((tmp_path / "outputs" / "runs").iterdir())
    sample = (run / "sample.txt").read_text()
    assert len(sample) == 21 and set(sample) <= set("ACGT")
    assert sample[0] == path.read_text()[-600]  # the first character of the validation split (the last 10%)


def test_a_failed_sample_is_a_warning_not_a_failed_run(tmp_path, corpus, cli):
    overrides = ["trainer.max_steps=6", "trainer.val_check_interval=2", "callbacks.text_sample.prompt='§'"]
    result = cli.train([f"data.path={corpus}", *TINY, *overrides], tmp_path)
    # three validations fail to sample for the same reason: one warning
    assert result.stderr.count("warning: no text sample") == 1 and "§" in result.stderr
    assert "val/bpc=" in result.stderr
    run = next((tmp_path / "outputs" / "runs").iterdir())
    assert (run / "checkpoints" / "last.ckpt").is_file() and not (run / "sample.txt").exists()


def test_a_time_budget_alone_drives_the_schedule_to_its_end(tmp_path, corpus, cli):
    result = cli.train(
        [
            f"data.path={corpus}",
            *TINY,
            "trainer.max_time=00:00:00:04",
            "trainer.log_every_n_steps=1",
            "lr_schedule.warmup_steps=5",
            "optimizer.lr=1e-3",
        ],
        tmp_path,
    )
    assert "a time budget of 00:00:00:04 (learning rate follows the time clock)" in result.stderr
    run = next((tmp_path / "outputs" / "runs").iterdir())
    lrs = scalars(run)["train/lr"]
    assert len(lrs) > 20, "a four-second budget holds many tiny steps"
    assert lrs[:5] == pytest.approx([1e-3 * (i + 1) / 5 for i in range(5)])  # warmup in steps
    decay = lrs[5:]
    assert all(b <= a + 1e-12 for a, b in zip(decay, decay[1:], strict=False)), "the cosine only goes down"
    assert decay[0] > 0.9e-3 and decay[-1] < 1.1e-4  # from the peak to min_lr_ratio * lr, ending with the budget
    assert "val/bpc=" in result.stderr


def test_warmup_stable_decay_holds_the_peak_then_cools_down_linearly():
    from lm.module import cosine_schedule

    lrs = [cosine_schedule(step, 10, 110, 0.1, shape="wsd", cooldown=0.2) for step in range(120)]
    assert lrs[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])  # the same warmup
    assert lrs[10:90] == [1.0] * 80  # stable: the first 80% of the decay period
    cooldown = lrs[90:111]
    assert cooldown == pytest.approx([1.0 - 0.9 * i / 20 for i in range(21)])  # linear to min_lr_ratio
    assert lrs[110:] == pytest.approx([0.1] * 10)  # held at the end
    assert cosine_schedule(60, 10, 110, 0.1) == pytest.approx(0.55)  # cosine stays the default: halfway, halfway


def test_warmup_stable_decay_follows_the_time_clock(tmp_path, corpus, cli):
    cli.train(
        [
            f"data.path={corpus}",
            *TINY,
            "trainer.max_time=00:00:00:04",
            "trainer.log_every_n_steps=1",
            "lr_schedule.warmup_steps=5",
            "lr_schedule.shape=wsd",
            "lr_schedule.cooldown=0.5",
            "optimizer.lr=1e-3",
        ],
        tmp_path,
    )
    lrs = scalars(next((tmp_path / "outputs" / "runs").iterdir()))["train/lr"]
    decay = lrs[5:]
    stable = [lr for lr in decay if lr == pytest.approx(1e-3)]
    assert len(stable) >= len(decay) // 4, "the peak holds for the first half of the budget"
    assert all(b <= a + 1e-12 for a, b in zip(decay, decay[1:], strict=False))
    assert decay[-1] < 2e-4  # cooled down to near min_lr_ratio * lr as the budget ends


def test_a_run_with_no_length_gets_the_default_time_budget_and_steps_stay_steps(tmp_path):
    from omegaconf import OmegaConf

    from lm.run_settings import run_length

    base = {"default_time_budget": "00:00:04:45", "lr_schedule": {"clock": "auto"}}
    trainer = {"max_steps": None, "max_epochs": None, "max_time": None}
    cfg = OmegaConf.create({**base, "trainer": trainer})
    assert run_length(cfg) == ({"max_steps": -1, "max_time": "00:00:04:45"}, "time")
    cfg = OmegaConf.create({**base, "trainer": {**trainer, "max_steps": 300}})
    assert run_length(cfg) == ({"max_steps": 300, "max_time": None}, "steps")
    cfg = OmegaConf.create({**base, "trainer": {**trainer, "max_steps": 300, "max_time": "00:01:00:00"}})
    assert run_length(cfg) == ({"max_steps": 300, "max_time": "00:01:00:00"}, "steps")  # time: a guard
    cfg = OmegaConf.create({**base, "trainer": {**trainer, "max_epochs": 2}})
    assert run_length(cfg)[1] == "steps"


def test_on_a_gpu_the_default_run_is_nanogpts_size_with_muon_compiled_for_1500_steps(monkeypatch, tmp_path):
    from hydra import compose, initialize_config_dir

    from lm import cli
    from lm.run_settings import should_compile

    monkeypatch.setattr(cli, "training_device_type", lambda accelerator: "cuda")
    argv = cli.recipe_for_this_machine(["train.py"])
    assert argv == ["train.py", *[f"{k}={v}" for k, v in cli.machine_recipes()["cuda"].items()]]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*argv[1:], f"paths.output_dir={tmp_path}"])
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.data.seq_length, cfg.data.batch_size) == (6, 384, 256, 64)
    assert cfg.optimizer._target_ == "lm.optim.MuonWithAdamW" and cfg.optimizer.lr == 1e-2
    assert cfg.trainer.max_steps == 1500 and should_compile(cfg.model.compile, "cuda")
    # your own choice still wins
    assert cli.recipe_for_this_machine(["train.py", "model=small"]) == ["train.py", "model=small"]
    assert "optimizer.lr=1e-2" not in cli.recipe_for_this_machine(["train.py", "optimizer=adamw"])


@pytest.mark.parametrize("native_bf16", [True, False])
def test_on_a_cpu_the_default_run_is_the_recipe_for_its_precision(monkeypatch, native_bf16):
    from lm import cli

    monkeypatch.setattr(cli, "training_device_type", lambda accelerator: "cpu")
    monkeypatch.setattr("lm.hardware.cpu_supports_bf16", lambda: native_bf16)
    kind = "cpu" if native_bf16 else "cpu_fp32"
    recipe = [f"{k}={v}" for k, v in cli.machine_recipes()[kind].items()]
    assert "model=mini" in recipe and "optimizer=muon" in recipe
    assert cli.recipe_for_this_machine(["train.py"]) == ["train.py", *recipe]
    multirun = ["train.py", "-m", "pos_encoding=learned,rope"]
    assert cli.recipe_for_this_machine(multirun) == ["train.py", "-m", *recipe, "pos_encoding=learned,rope"]
    # the overrides stay together, so flags after them still parse
    assert cli.recipe_for_this_machine(["train.py", "seed=1", "--cfg", "job"])[-3:] == ["seed=1", "--cfg", "job"]
    # an explicit size or recipe decides instead
    for argv in (
        ["train.py", "model=small"],
        ["train.py", "experiment=shakespeare_hour"],
        ["train.py", "debug=default"],
    ):
        assert cli.recipe_for_this_machine(argv) == argv
    # your own value for a key wins; an optimizer of your choosing keeps its own learning rate
    mine = cli.recipe_for_this_machine(["train.py", "optimizer=adafactor", "data.batch_size=4"])
    added = mine[1:-2]
    assert "model=mini" in added and not any(a.startswith(("optimizer", "data.batch_size")) for a in added)
    # another setting of the recipe's optimizer keeps the recipe's optimizer and its learning rate
    tweaked = cli.recipe_for_this_machine(["train.py", "optimizer.weight_decay=0"])
    assert {"optimizer=muon", f"optimizer.lr={cli.machine_recipes()[kind]['optimizer.lr']}"} <= set(tweaked[1:-1])
    # fp32 asked for on a bf16 CPU takes the fp32 recipe, and bf16 asked for on any CPU the bf16 one
    fp32 = [f"{k}={v}" for k, v in cli.machine_recipes()["cpu_fp32"].items()]
    assert cli.recipe_for_this_machine(["train.py", "trainer.precision=32-true"])[1:-1] == fp32
    bf16 = [f"{k}={v}" for k, v in cli.machine_recipes()["cpu"].items()]
    assert cli.recipe_for_this_machine(["train.py", "trainer.precision=bf16-mixed"])[1:-1] == bf16
    assert cli.recipe_for_this_machine(["train.py", "trainer.precision=16-mixed"])[1:-1] == bf16  # refused later


@pytest.mark.parametrize("kind", ["cpu", "cpu_fp32", "cuda"])
def test_every_machine_recipe_composes_into_a_model_and_optimizer(kind, tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from lm import cli
    from lm.model import Transformer
    from lm.optim import parameter_groups
    from lm.train import model_config

    overrides = [f"{k}={v}" for k, v in cli.machine_recipes()[kind].items()]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"paths.output_dir={tmp_path}"])
    config, _ = model_config(cfg, vocab_size=65)
    optimizer = instantiate(cfg.optimizer)(parameter_groups(Transformer(config)))
    assert optimizer.param_groups[0]["lr"] == float(cli.machine_recipes()[kind]["optimizer.lr"])


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"warmup_steps": -5}, "lr_schedule.warmup_steps=-5"),
        ({"warmup_steps": True}, "lr_schedule.warmup_steps=True"),
        ({"min_lr_ratio": 1.5}, "lr_schedule.min_lr_ratio=1.5"),
        ({"total_steps": 0}, "lr_schedule.total_steps=0"),
        ({"shape": "linear"}, "lr_schedule.shape='linear' is not one of cosine, wsd"),
        ({"cooldown": 1.5}, "lr_schedule.cooldown=1.5"),
        ({"optimizer": lambda groups: torch.optim.AdamW(groups, lr=-1.0)}, "optimizer refused its settings"),
    ],
)
def test_bad_schedule_and_optimizer_settings_are_config_errors(settings, message):
    from lm.errors import ConfigError

    config = TransformerConfig(vocab_size=10, seq_length=8, n_layer=1, n_head=2, n_embd=8)
    settings = {"optimizer": torch.optim.AdamW, **settings}
    with pytest.raises(ConfigError, match=re.escape(message)):
        LanguageModel(config, "".join(map(str, range(10))), **settings).build_optimizer()


def test_float16_mixed_precision_on_a_cpu_is_refused_not_turned_into_bf16():
    from lm import hardware
    from lm.errors import ConfigError

    for requested in ("16-mixed", 16):
        with pytest.raises(ConfigError, match="needs a GPU"):
            hardware.resolve_precision(requested, "cpu")
    assert hardware.resolve_precision("16-mixed", "cuda")[0] == "16-mixed"


def test_bf16_on_a_cpu_that_only_emulates_it_gets_a_warning(monkeypatch):
    from lm import hardware

    monkeypatch.setattr(hardware, "cpu_supports_bf16", lambda: False)
    monkeypatch.setattr(hardware, "cpu_has_bf16_instructions", lambda: False)
    assert "very slow" in hardware.emulated_bf16_warning("bf16-mixed", "cpu")
    assert hardware.emulated_bf16_warning("32-true", "cpu") is None
    monkeypatch.setattr(hardware, "cpu_supports_bf16", lambda: True)
    assert hardware.emulated_bf16_warning("bf16-mixed", "cpu") is None


def test_lm_cpu_bf16_0_runs_a_bf16_cpu_as_an_fp32_only_one(monkeypatch):
    from lm import hardware

    monkeypatch.setenv("LM_CPU_BF16", "0")
    assert not hardware.cpu_supports_bf16() and not hardware.bf16_supported("cpu")
    assert hardware.resolve_precision("auto", "cpu")[0] == "32-true"


@pytest.mark.parametrize("share,expected", [("null", [2, 4, 6, 8, 10, 12]), ("0.0001", [2, 12])])
def test_text_samples_stay_within_their_share_of_training_time(tmp_path, corpus, share, expected, cli):
    # 0.0001 of a few seconds is less than one 200-character sample: the first validation samples (its cost is not
    # known before), then only the end of training; null samples at every validation
    overrides = ["trainer.max_steps=12", "trainer.val_check_interval=2", "callbacks.text_sample.max_new_tokens=200"]
    cli.train([f"data.path={corpus}", *TINY, *overrides, f"callbacks.text_sample.max_time_share={share}"], tmp_path)
    run = next((tmp_path / "outputs" / "runs").iterdir())
    assert text_samples(run) == expected
    assert (run / "sample.txt").read_text()


def test_samples_at_each_validation_and_a_final_evaluation_past_the_training_context(tmp_path, corpus, cli):
    import json

    result = cli.train(
        [
            f"data.path={corpus}",
            *TINY,
            "pos_encoding=alibi",
            "trainer.max_steps=8",
            "trainer.val_check_interval=4",
            "final_eval.context_multiples=[1,2,4]",
        ],
        tmp_path,
    )
    run = next((tmp_path / "outputs" / "runs").iterdir())
    assert text_samples(run) == [4, 8]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["global_step"] == 8
    # each validation timed, with the sample and checkpoint calls after it, and when it ended
    validations = summary["validations"]
    assert [v["step"] for v in validations] == [4, 8]
    assert validations[-1]["val_loss"] == pytest.approx(summary["metrics"]["val/loss"])
    for v in validations:
        assert v["loop_s"] > 0 and v["after_s"] > 0 and v["seconds"] == pytest.approx(v["loop_s"] + v["after_s"])
    assert validations[0]["time"] < validations[1]["time"]
    assert validations[0]["fit_seconds"] < validations[1]["fit_seconds"] <= summary["fit_seconds"]
    assert summary["validation_seconds"] == pytest.approx(sum(v["seconds"] for v in validations))
    assert re.search(
        r"validation: 2 passes took [0-9.]+ s, [0-9.]+% of the [0-9.]+ s that training took", result.stderr
    )
    results = json.loads((run / "final.eval.json").read_text())["results"]
    assert [r["context_length"] for r in results] == [32, 64, 128] and all(r["loss"] for r in results)
    # validation in training and evaluation share one loss function: same windows, same number
    assert results[0]["loss"] == pytest.approx(summary["metrics"]["val/loss"], abs=1e-5)
    assert summary["metrics"]["val/best_loss"] == pytest.approx(min(scalars(run)["val/loss"]))


def test_compile_auto_compiles_on_cuda_only_and_bad_values_are_one_sentence():
    from lm.errors import ConfigError
    from lm.run_settings import should_compile

    assert should_compile("auto", "cuda") and not should_compile("auto", "cpu")
    assert should_compile(True, "cpu") and not should_compile(False, "cuda")
    with pytest.raises(ConfigError, match="model.compile=maybe must be true, false or auto."):
        should_compile("maybe", "cpu")


def test_every_output_counts_steps_as_the_optimizer_steps_taken(tmp_path, corpus):
    import json

    from helpers import train_in_process

    from lm.report.sweep import read_curves

    common = [f"data.path={corpus}", *TINY, "trainer.max_steps=20", "trainer.val_check_interval=10"]
    _, run = train_in_process(common, tmp_path, name="tensorboard")
    assert json.loads((run / "summary.json").read_text())["global_step"] == 20
    curves = read_curves(run)  # what the report's plots draw
    assert curves["val/loss"].steps == [10, 20] and curves["train/loss"].steps == [10, 20]
    assert text_samples(run) == [10, 20]
    _, run = train_in_process([*common, "logger=csv"], tmp_path, name="csv")
    rows = (run / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    logged = [dict(zip(header, row.split(","), strict=True)) for row in rows[1:]]
    assert [int(r["step"]) for r in logged if r["val/loss"]] == [10, 20]
    assert [int(r["step"]) for r in logged if r["train/loss"]] == [10, 20]


@pytest.mark.parametrize(
    "instructions,speedup,setting,pays",
    [
        (True, 4.0, None, True),  # AMX: bf16 products several times fp32's
        (True, 0.5, None, False),  # AVX-512 BF16 alone, slower than fp32 (an Intel Xeon with AMX hidden)
        (True, 1.1, None, False),  # within the casts' cost: fp32
        (True, 0.5, "1", True),  # LM_CPU_BF16=1 takes the instructions' word, unmeasured
        (True, 4.0, "0", False),
        (False, 4.0, "1", False),  # without the instructions bf16 is emulated
    ],
)
def test_auto_precision_takes_bf16_on_a_cpu_only_where_its_products_run_clearly_faster(
    monkeypatch, instructions, speedup, setting, pays
):
    from lm import hardware

    monkeypatch.setattr(hardware, "cpu_has_bf16_instructions", lambda: instructions)
    monkeypatch.setattr(hardware, "bf16_matmul_speedup", lambda: speedup)
    if setting is None:
        monkeypatch.delenv("LM_CPU_BF16", raising=False)
    else:
        monkeypatch.setenv("LM_CPU_BF16", setting)
    assert hardware.cpu_supports_bf16() is pays
    precision, why = hardware.resolve_precision("auto", "cpu")
    assert precision == ("bf16-mixed" if pays else "32-true")
    warning = hardware.emulated_bf16_warning("bf16-mixed", "cpu")
    if pays:
        assert warning is None
    elif instructions and setting != "0":
        assert f"measured {speedup:.2f}x fp32's speed" in why and f"run at {speedup:.2f}x fp32's speed" in warning
    elif not instructions:
        assert "no native bf16" in why and "emulated and very slow" in warning


def test_the_bf16_speedup_is_measured_once_per_process():
    from lm import hardware

    hardware.bf16_matmul_speedup.cache_clear()
    torch.manual_seed(0)
    speedup = hardware.bf16_matmul_speedup(size=64, reps=1, rounds=1)
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(0).get_state())  # the global stream untouched
    assert speedup > 0 and hardware.bf16_matmul_speedup(size=64, reps=1, rounds=1) is speedup
    hardware.bf16_matmul_speedup.cache_clear()
