"""scripts/export.py: the Hugging Face format. Every positional encoding and block option exports, loads with
`transformers` offline, and gives the same fp32 logits (<= 1e-4) and the same greedy text as the checkpoint; the
tokenizer round-trips; an export reads back into transformer-lm; bad input writes nothing."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import FAST, VOCAB, only_run, run_train

from lm import generate, load_model
from lm.errors import CheckpointError, ConfigError, LMError
from lm.hub import export as export_module
from lm.hub.export import export
from lm.hub.families import native_family
from lm.hub.load import EXPORT_META
from lm.hub.tokenizer import build_tokenizer
from lm.model import Transformer, TransformerConfig
from lm.tokenizer import CharTokenizer

transformers = pytest.importorskip("transformers")
os.environ["HF_HUB_OFFLINE"] = "1"  # an export loads from its directory alone

BASE = dict(n_layer=2, n_head=4, n_embd=32, seq_length=24)
# each positional encoding and each block option at least once; the class each must take (None: custom code)
CASES = {
    "rope-default": ({}, "GPTNeoXForCausalLM"),
    "learned": ({"pos_encoding": {"name": "learned"}}, "GPT2LMHeadModel"),
    "sinusoidal": ({"pos_encoding": {"name": "sinusoidal"}, "mlp": "relu2"}, "GPT2LMHeadModel"),
    "none-relu-bias": ({"pos_encoding": {"name": "none"}, "mlp": "relu", "bias": True}, "GPT2LMHeadModel"),
    "rope-half-rotary": (
        {
            "pos_encoding": {"name": "rope", "rotary_fraction": 0.5, "base": 500.0},
            "bias": True,
            "tie_embeddings": False,
        },
        "GPTNeoXForCausalLM",
    ),
    "llama": (
        {"norm": "rmsnorm", "mlp": "swiglu", "n_kv_head": 2, "tie_embeddings": False, "bias": True},
        "LlamaForCausalLM",
    ),
    "qwen3": ({"norm": "rmsnorm", "mlp": "swiglu", "qk_norm": True, "tie_embeddings": False}, "Qwen3ForCausalLM"),
    "arcee": ({"norm": "rmsnorm", "mlp": "relu2", "n_kv_head": 1}, "ArceeForCausalLM"),
    "apertus": ({"norm": "rmsnorm", "mlp": "relu2", "qk_norm": True, "tie_embeddings": False}, "ApertusForCausalLM"),
    "modern-softcap": (
        {"norm": "rmsnorm", "mlp": "relu2", "qk_norm": True, "tie_embeddings": False, "logit_softcap": 3.0},
        None,
    ),
    "alibi": ({"pos_encoding": {"name": "alibi"}, "dropout": 0.1}, None),
    "t5": ({"pos_encoding": {"name": "t5"}, "mlp": "swiglu"}, None),
    "fire": ({"pos_encoding": {"name": "fire"}, "norm": "rmsnorm"}, None),
    "xpos": ({"pos_encoding": {"name": "xpos"}, "qk_norm": True}, None),
    "post-ln": ({"norm_position": "post", "bias": True}, None),
    "window-sinks-gqa": ({"attention_window": 6, "attention_sinks": 2, "n_kv_head": 2}, None),
    "rope-yarn": ({"pos_encoding": {"name": "rope", "scaling": "yarn", "scaling_factor": 2.0}}, None),
    "learned-qk-norm": ({"pos_encoding": {"name": "learned"}, "qk_norm": True, "tie_embeddings": False}, None),
    "unet-skips": ({"unet_skips": True, "n_layer": 3}, None),
    "value-embeddings-residual-gqa": ({"value_embeddings": 1, "value_residual": True, "n_kv_head": 1}, None),
}


def write_checkpoint(path, options: dict, vocab: str = VOCAB, seed: int = 0, data: dict | None = None) -> Transformer:
    """A checkpoint of a random model (as train.py writes it: weights under "model.", the config and vocabulary
    beside them), its gains and biases moved off 1 and 0 so a mapping that drops one shows."""
    torch.manual_seed(seed)
    config = TransformerConfig(vocab_size=len(vocab), **{**BASE, **options})
    model = Transformer(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.2)
    checkpoint = {
        "state_dict": {f"model.{key}": value for key, value in model.state_dict().items()},
        "transformer_lm": {"format": 1, "model_config": config.to_dict(), "vocab": vocab, "data": data or {}},
        "global_step": 7,
    }
    torch.save(checkpoint, path)
    return model.eval()


def load_hf(directory, custom: bool):
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=custom).eval()
    return model, transformers.AutoTokenizer.from_pretrained(directory)


@pytest.mark.parametrize("case", list(CASES))
def test_every_option_exports_with_the_same_logits_and_greedy_text(tmp_path, case):
    options, architecture = CASES[case]
    model = write_checkpoint(tmp_path / "model.ckpt", options)
    report = export(tmp_path / "model.ckpt", tmp_path / f"export-{case}")
    assert report.native == (architecture is not None)
    assert report.architecture == (architecture or "TransformerLMForCausalLM")
    assert (native_family(model.config) is None) == (architecture is None)
    directory = report.path
    for name in (
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
    ):
        assert (directory / name).is_file(), name
    hf_model, hf_tokenizer = load_hf(directory, custom=architecture is None)
    assert type(hf_model).__name__ == report.architecture

    ids = torch.randint(len(VOCAB), (3, BASE["seq_length"]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids), hf_model(input_ids=ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4

    prompt = "Thou art"
    tokenizer = CharTokenizer(VOCAB)
    expected = generate(model, tokenizer, prompt, 14, temperature=0, exact=True)[0]  # fp32 decoding
    inputs = hf_tokenizer(prompt, return_tensors="pt")
    assert inputs.input_ids.tolist()[0] == tokenizer.encode(prompt).tolist()
    output = hf_model.generate(**inputs, max_new_tokens=14, do_sample=False)
    assert hf_tokenizer.decode(output[0]) == expected

    # and back: transformer-lm reads the export as the same model
    back, back_tokenizer = load_model(directory)
    assert back_tokenizer.vocab == VOCAB and back.config == model.config
    with torch.no_grad():
        assert torch.allclose(back(ids), ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pe", ["sinusoidal", "none"])
def test_fixed_and_empty_positions_go_on_past_the_context_as_ours_do(tmp_path, pe):
    model = write_checkpoint(tmp_path / "m.ckpt", {"pos_encoding": {"name": pe}})
    hf_model, _ = load_hf(export(tmp_path / "m.ckpt", tmp_path / f"past-{pe}").path, custom=False)
    ids = torch.randint(len(VOCAB), (1, 4 * BASE["seq_length"]), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model(ids) - hf_model(input_ids=ids).logits).abs().max().item() <= 1e-4


def test_learned_positions_generate_up_to_the_context(tmp_path):
    write_checkpoint(tmp_path / "m.ckpt", {"pos_encoding": {"name": "learned"}})
    directory = export(tmp_path / "m.ckpt", tmp_path / "learned-context").path
    generation = json.loads((directory / "generation_config.json").read_text())
    assert generation["max_length"] == BASE["seq_length"] and "max_new_tokens" not in generation
    assert "Its learned positions end at 24" in (directory / "README.md").read_text()


def test_the_exports_sampling_defaults_are_generate_pys():
    from omegaconf import OmegaConf

    from lm.config import CONFIG_DIR

    defaults = OmegaConf.load(f"{CONFIG_DIR}/generate.yaml")
    assert export_module.SAMPLING == {
        "do_sample": defaults.temperature > 0,
        "temperature": defaults.temperature,
        "max_new_tokens": defaults.max_new_tokens,
    }


def test_tied_weights_are_stored_once_and_tie_again(tmp_path):
    from safetensors.torch import load_file

    write_checkpoint(tmp_path / "tied.ckpt", {})  # rope: GPT-NeoX, tied
    export(tmp_path / "tied.ckpt", tmp_path / "tied")
    assert "lm_head.weight" not in load_file(tmp_path / "tied" / "model.safetensors")
    hf_model, _ = load_hf(tmp_path / "tied", custom=False)
    assert hf_model.lm_head.weight.data_ptr() == hf_model.gpt_neox.embed_in.weight.data_ptr()
    write_checkpoint(tmp_path / "custom.ckpt", {"pos_encoding": {"name": "alibi"}})
    export(tmp_path / "custom.ckpt", tmp_path / "custom")
    assert "model.head.weight" not in load_file(tmp_path / "custom" / "model.safetensors")
    hf_model, _ = load_hf(tmp_path / "custom", custom=True)
    assert hf_model.model.head.weight.data_ptr() == hf_model.model.token_embedding.weight.data_ptr()


def test_custom_export_carries_its_code_and_auto_map(tmp_path):
    write_checkpoint(tmp_path / "m.ckpt", {"pos_encoding": {"name": "t5"}})
    directory = export(tmp_path / "m.ckpt", tmp_path / "t5").path
    config = json.loads((directory / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_transformer_lm.TransformerLMForCausalLM"
    for name in ("modeling_transformer_lm.py", "configuration_transformer_lm.py", "model.py", "positional.py"):
        source = (directory / name).read_text()
        assert "from lm." not in source and "import lm" not in source, name
    assert "from .model import Transformer, TransformerConfig" in (directory / "modeling_transformer_lm.py").read_text()
    with pytest.raises(ValueError, match="trust_remote_code"):  # never run without the user's consent
        transformers.AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=False)


@pytest.mark.parametrize("text", ["To be, or not to be:\n\n  that is the question? ", "\n", " a  b ", "A\n\n\nz!"])
def test_tokenizer_round_trips_text_spaces_and_newlines(text):
    tokenizer = build_tokenizer(VOCAB)
    ids = tokenizer(text)["input_ids"]
    assert ids == CharTokenizer(VOCAB).encode(text).tolist()
    assert tokenizer.decode(ids) == text


def test_tokenizer_refuses_characters_outside_the_vocabulary():
    tokenizer = build_tokenizer(VOCAB)
    with pytest.raises(Exception, match="Missing \\[UNK\\] token"):
        tokenizer("caf\u00e9")


def test_byte_level_tokenizer_round_trips_any_utf8_text():
    text = "na\u00efve caf\u00e9 \u2014 \U0001f642\n"
    vocab = "".join(sorted(set(text.encode("utf-8").decode("latin-1"))))
    ours = CharTokenizer(vocab, byte_level=True)
    tokenizer = build_tokenizer(vocab, byte_level=True)
    ids = tokenizer(text)["input_ids"]
    assert ids == ours.encode(ours.to_symbols(text)).tolist()
    assert tokenizer.decode(ids) == text


def test_a_byte_level_model_exports_a_byte_tokenizer(tmp_path):
    text = "caf\u00e9 \u2014 na\u00efve\n"
    vocab = "".join(sorted(set(text.encode("utf-8").decode("latin-1"))))
    model = write_checkpoint(tmp_path / "bytes.ckpt", {}, vocab=vocab, data={"encoding": "bytes"})
    hf_model, hf_tokenizer = load_hf(export(tmp_path / "bytes.ckpt", tmp_path / "bytes").path, custom=False)
    ids = hf_tokenizer(text, return_tensors="pt").input_ids
    assert ids.shape[1] == len(text.encode("utf-8")) and hf_tokenizer.decode(ids[0]) == text
    with torch.no_grad():
        assert (model(ids) - hf_model(input_ids=ids).logits).abs().max().item() <= 1e-4
    _, tokenizer = load_model(tmp_path / "bytes")
    assert tokenizer.byte_level


@pytest.fixture(scope="module")
def trained_and_exported(tmp_path_factory):
    """A run of the tiny model (scripts/train.py's run directory) and its export by scripts/export.py."""
    tmp_path = tmp_path_factory.mktemp("export_run")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Thou art my lord, and the king shall be.\nThe queen of love!\n" * 60)
    run_train([*FAST, f"data.path={corpus}", "trainer.max_steps=30"], tmp_path, in_process=True)
    return only_run(tmp_path / "outputs"), tmp_path


def test_export_script_then_transformers_pipeline_and_generate_agree(trained_and_exported, cli):
    run, tmp_path = trained_and_exported
    out = tmp_path / "exported"
    result = cli.script("export.py", f"ckpt={run}", f"out={out}")
    assert "GPTNeoXForCausalLM, native transformers class" in result.stdout
    assert len(result.stdout.strip().splitlines()) == 1 and result.stderr == ""
    model, tokenizer = load_hf(out, custom=False)
    pipe = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)
    text = pipe("The king", max_new_tokens=30, do_sample=False)[0]["generated_text"]
    ours = cli.script("generate.py", f"ckpt={run}", "prompt=The king", "max_new_tokens=30", "temperature=0").stdout
    from_export = cli.script("generate.py", f"ckpt={out}", "prompt=The king", "max_new_tokens=30", "temperature=0")
    assert text == ours.rstrip("\n") == from_export.stdout.rstrip("\n")
    assert "  " not in text.replace("\n", "") or "  " in ours  # no spaces inserted between characters

    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    summary = json.loads((run / "summary.json").read_text())["metrics"]
    assert f"| val/loss | {summary['val/loss']:.4f} |" in card and f"| val/bpc | {summary['val/bpc']:.4f} |" in card
    assert "trainer.max_steps=30" in card and "| training steps | 30 |" in card
    assert "adamw (lr " in card and "precision 32-true" in card
    assert "GPTNeoXForCausalLM (native)" in card and "AutoModelForCausalLM.from_pretrained" in card
    meta = json.loads((out / EXPORT_META).read_text())
    assert meta["family"] == "gpt_neox" and meta["global_step"] == 30

    evaluated = cli.script("evaluate.py", f"ckpt={out}", f"output={tmp_path / 'eval'}").stdout  # on the run's own split
    loss = float(evaluated.strip().splitlines()[-1].split("|")[3])  # bf16 where the CPU has it: not to the digit
    assert loss == pytest.approx(summary["val/loss"], abs=2e-3)


def test_the_card_reports_the_runs_metrics_only_for_its_last_weights(tmp_path):
    from lm.hub.card import run_record

    (tmp_path / "checkpoints").mkdir()
    summary = {"global_step": 500, "metrics": {"val/loss": 1.5}, "hparams": {}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert run_record(tmp_path / "checkpoints" / "last.ckpt", 500)[0] == {"val/loss": 1.5}
    assert run_record(tmp_path / "checkpoints" / "best.ckpt", 300)[0] == {}  # an earlier step's weights


def test_fine_tuning_starts_from_an_export_in_a_new_run(trained_and_exported, cli):
    run, tmp_path = trained_and_exported
    out = tmp_path / "for_init"
    export(run, out)
    corpus = tmp_path / "corpus.txt"
    result = cli.train(
        [
            *FAST,
            f"data.path={corpus}",
            f"init_from={out}",
            "trainer.max_steps=3",
            "hydra.run.dir=" + str(tmp_path / "ft"),
        ],
        tmp_path,
    )
    assert f"starting from the weights of {out} (step 30 of its run" in result.stdout + result.stderr
    refused = cli.train(
        [*FAST, f"data.path={corpus}", f"ckpt_path={out}", "trainer.max_steps=40"], tmp_path, check=False
    )
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        f"error: ckpt_path={out} is an exported model, which keeps the weights but not the optimizer or schedule to "
        f"go on with; start a new run from its weights with init_from={out}."
    )


def test_bad_input_writes_nothing(trained_and_exported, cli, tmp_path):
    run, _ = trained_and_exported
    missing = cli.script("export.py", f"ckpt={tmp_path / 'nope'}", f"out={tmp_path / 'a'}", check=False)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "does not exist" in missing.stderr
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    taken = cli.script("export.py", f"ckpt={run}", f"out={busy}", check=False)
    assert taken.returncode == 1 and "exists and is not empty" in taken.stderr
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    torch.save({"state_dict": {}, "hello": 1}, tmp_path / "foreign.ckpt")
    foreign = cli.script("export.py", f"ckpt={tmp_path / 'foreign.ckpt'}", f"out={tmp_path / 'b'}", check=False)
    assert foreign.returncode == 1 and "not a checkpoint of transformer-lm" in foreign.stderr
    no_out = cli.script("export.py", f"ckpt={run}", check=False)
    assert no_out.returncode == 1 and "out= is required" in no_out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "foreign.ckpt"]  # no partial directories


def test_a_failed_export_removes_what_it_wrote(trained_and_exported, tmp_path, monkeypatch):
    run, _ = trained_and_exported
    monkeypatch.setattr(export_module, "compare_logits", lambda *args, **kwargs: 0.5)
    with pytest.raises(CheckpointError, match="logits 5.0e-01 away"):
        export(run, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_export_without_the_optional_packages_says_so_in_one_line(trained_and_exported, tmp_path, monkeypatch):
    run, _ = trained_and_exported
    monkeypatch.setattr(export_module, "_importable", lambda name: name != "transformers")
    with pytest.raises(LMError, match=r'Exporting needs transformers, .* pip install -e "\.\[hf\]"'):
        export(run, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_an_export_is_not_exported_again(trained_and_exported, tmp_path):
    run, root = trained_and_exported
    export(run, tmp_path / "once")
    with pytest.raises(ConfigError, match="is an export already"):
        export(tmp_path / "once", tmp_path / "twice")
