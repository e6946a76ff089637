"""An average of the weights (callbacks.ema_weights.decay): what it averages, what reads it, resume, bad input."""

import lightning as L
import pytest
import torch
from helpers import FAST, csv_column, last_checkpoint, only_run

from lm.callbacks import EMAWeights
from lm.callbacks.ema import ema_decay
from lm.checkpoint import load_model, model_state
from lm.config import compose_config
from lm.data import CharDataModule
from lm.errors import ConfigError
from lm.loss import summed_loss
from lm.train import train


class RecordWeights(L.Callback):
    """The trained weights when training starts and after every step; listed after EMAWeights, so each step's
    record is taken once the average has taken that step in."""

    def __init__(self):
        self.weights: list[list[torch.Tensor]] = []

    def record(self, pl_module) -> None:
        self.weights.append([p.detach().double().clone() for p in pl_module.model.parameters()])

    def on_fit_start(self, trainer, pl_module) -> None:
        self.record(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.record(pl_module)


def reference_average(weights: list[list[torch.Tensor]], decay: float) -> list[torch.Tensor]:
    average = [w.clone() for w in weights[0]]
    for n, step in enumerate(weights[1:]):
        d = min(decay, (1 + n) / (10 + n))
        average = [d * a + (1 - d) * w for a, w in zip(average, step, strict=True)]
    return average


def test_the_decay_warms_up_to_its_setting():
    assert ema_decay(0.999, 0) == pytest.approx(0.1)
    assert ema_decay(0.999, 90) == pytest.approx(0.91)
    assert ema_decay(0.9, 80) == 0.9 and ema_decay(0.999, 10**6) == 0.999


def test_validation_checkpoints_and_the_final_model_read_the_average_of_the_trained_weights(tmp_path, corpus):
    decay, run_dir = 0.8, tmp_path / "outputs" / "runs" / "ema"
    overrides = [
        f"data.path={corpus}",
        *FAST,
        "optimizer.lr=1e-2",
        "trainer.max_steps=8",
        f"callbacks.ema_weights.decay={decay}",
        f"paths.output_dir={tmp_path / 'outputs'}",
        f"paths.run_dir={run_dir}",
    ]
    recorder = RecordWeights()
    metrics = train(compose_config(overrides), callbacks=[recorder])
    assert len(recorder.weights) == 9  # the start and 8 steps

    checkpoint = last_checkpoint(run_dir)
    model, _ = load_model(run_dir / "checkpoints" / "last.ckpt")  # the tied head's name loads last: it counts too
    averaged = [p.detach() for p in model.parameters()]
    trained = checkpoint["callbacks"]["EMAWeights"]["training_weights"]
    assert checkpoint["callbacks"]["EMAWeights"]["updates"] == 8
    for ours, reference in zip(averaged, reference_average(recorder.weights, decay), strict=True):
        torch.testing.assert_close(ours.double(), reference, atol=1e-6, rtol=0)
    for ours, reference in zip(trained, recorder.weights[-1], strict=True):
        torch.testing.assert_close(ours.double(), reference, atol=0, rtol=0)
    assert not all(torch.allclose(a, t) for a, t in zip(averaged, trained, strict=True)), "nothing was averaged"

    # the logged val/loss is the average's, over the whole validation split
    data = CharDataModule(path=str(corpus), seq_length=32, batch_size=8)
    data.setup("fit")
    with torch.no_grad():
        sums = [summed_loss(model, x, y) for x, y in data.val_dataloader()]
    loss = sum(s for s, _ in sums) / sum(c for _, c in sums)
    assert metrics["val/loss"] == pytest.approx(float(loss), abs=1e-5)
    assert csv_column(run_dir, "val/loss")[-1] == pytest.approx(float(loss), abs=1e-5)
    # best.ckpt (the only validation is the last) holds the same average
    best = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    for key, value in model_state(best).items():
        assert torch.equal(value, model_state(checkpoint)[key]), key


def test_a_resumed_run_averages_on_as_an_uninterrupted_one(tmp_path, corpus, cli):
    common = [
        f"data.path={corpus}",
        *FAST,
        "optimizer=muon",
        "callbacks.ema_weights.decay=0.8",
        "lr_schedule.warmup_steps=2",
        "lr_schedule.total_steps=12",
    ]
    straight, split = tmp_path / "straight", tmp_path / "split"
    cli.train([*common, "trainer.max_steps=12"], straight)
    cli.train([*common, "trainer.max_steps=6"], split)
    first_half = only_run(split / "outputs")
    cli.train([*common, "trainer.max_steps=12", f"resume={first_half}"], split)

    a, b = last_checkpoint(only_run(straight / "outputs")), last_checkpoint(first_half)
    assert a["global_step"] == b["global_step"] == 12
    assert a["callbacks"]["EMAWeights"]["updates"] == b["callbacks"]["EMAWeights"]["updates"] == 12
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(value, b["state_dict"][key], atol=1e-6, rtol=0, msg=key)
    for ours, theirs in zip(*(c["callbacks"]["EMAWeights"]["training_weights"] for c in (a, b)), strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    val_a, val_b = (csv_column(only_run(d / "outputs"), "val/loss")[-1] for d in (straight, split))
    assert val_a == pytest.approx(val_b, abs=1e-6)


def test_resuming_an_averaged_run_without_its_average_is_refused_before_anything_changes(tmp_path, corpus, cli):
    common = [f"data.path={corpus}", *FAST]
    cli.train([*common, "trainer.max_steps=4", "callbacks.ema_weights.decay=0.9"], tmp_path)
    run = only_run(tmp_path / "outputs")
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    result = cli.train(
        [*common, "trainer.max_steps=8", "callbacks.ema_weights.decay=null", f"resume={run}"], tmp_path, False
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "kept an average of its weights" in line and "callbacks.ema_weights.decay=0.9" in line, line
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before


def test_without_a_decay_the_callback_keeps_nothing(tmp_path, corpus, cli):
    cli.train([f"data.path={corpus}", *FAST, "trainer.max_steps=3"], tmp_path)
    assert not last_checkpoint(only_run(tmp_path / "outputs"))["callbacks"].get("EMAWeights")  # no state saved


@pytest.mark.parametrize("decay", [0, 1, 1.5, -0.1, True, "high"])
def test_a_decay_outside_zero_to_one_is_refused_in_one_line(decay):
    with pytest.raises(ConfigError, match=f"callbacks.ema_weights.decay={decay} must be between 0 and 1"):
        EMAWeights(decay=decay)


def test_a_bad_decay_on_the_command_line_is_one_sentence_and_creates_no_run(tmp_path, corpus, cli):
    result = cli.train([f"data.path={corpus}", *FAST, "callbacks.ema_weights.decay=1.5"], tmp_path, False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "callbacks.ema_weights.decay=1.5 must be between 0 and 1" in result.stderr.strip().splitlines()[-1]
    assert not list((tmp_path / "outputs").glob("runs/*"))
