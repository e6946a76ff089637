"""The package's layers (docs/architecture.md): imports run one way, with no cycle; the model knows no framework;
the configs target only the package and libraries."""

import ast
import re
from pathlib import Path

import pytest
from helpers import ROOT

PACKAGE = ROOT / "lm"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Each module of lm: the modules it imports at its top level (lm's and libraries'); imports inside functions
    are left out."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        found = set()
        tree = ast.parse(path.read_text())
        top = [n for stmt in tree.body for n in ([stmt] if not isinstance(stmt, ast.If) else ast.walk(stmt))]
        for node in top:  # top-level imports, also those under `if TYPE_CHECKING:`
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
        graph[module_name(path)] = found
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """The lm modules that importing `start` loads (a package's __init__ included for its submodules)."""
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name in seen or name not in graph:
            continue
        seen.add(name)
        for target in graph[name]:
            parts = target.split(".")
            todo += [".".join(parts[:i]) for i in range(2, len(parts) + 1)]
    return seen


def test_no_import_cycle_among_the_packages_modules():
    graph = imports()
    lm_graph = {m: {t for t in targets if t in graph and t != "lm"} for m, targets in graph.items()}
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(lm_graph[name]):
            if state.get(target) == 1 and not target.startswith(name + "."):  # a package importing its own parts
                pytest.fail(f"import cycle: {' -> '.join([*path, name, target])}")
            if target not in state:
                visit(target, [*path, name])
        state[name] = 2

    for name in sorted(lm_graph):
        if name not in state:
            visit(name, [])


@pytest.mark.parametrize("name", ["lm.model", "lm.positional", "lm.kernels", "lm.tokenizer"])
def test_the_model_layer_is_plain_torch(name):
    loaded = reachable(imports(), name)
    frameworks = {t.split(".")[0] for m in loaded for t in imports()[m]} & {"lightning", "hydra", "omegaconf"}
    assert not frameworks, f"{name} loads {frameworks}"
    assert not loaded & {"lm.decoding", "lm.generate", "lm.module", "lm.data"}, loaded


@pytest.mark.parametrize("name", ["lm.module", "lm.data", "lm.loss", "lm.evaluate", "lm.run_settings"])
def test_training_and_its_evaluation_load_no_generation_code(name):
    assert not reachable(imports(), name) & {"lm.generate", "lm.decoding", "lm.past_context"}


def test_the_package_imports_no_script_and_conf_targets_only_the_package_and_libraries():
    for module, targets in imports().items():
        assert not {t for t in targets if t.startswith(("_common", "scripts", "train", "compare"))}, module
    for path in (ROOT / "conf").rglob("*.yaml"):
        for target in re.findall(r"_target_:\s*([\w.]+)", path.read_text()):
            assert target.split(".")[0] in {"lm", "lightning", "torch", "hydra_plugins"}, f"{path}: {target}"


@pytest.mark.parametrize("name", ["lm.train", "lm.commands", "lm.checkpoint", "lm.run_settings"])
def test_training_and_the_other_commands_load_no_hugging_face_package(name):
    """transformers, tokenizers and safetensors are an optional extra (".[hf]"): only export.py loads them."""
    graph = imports()
    loaded = {t.split(".")[0] for m in reachable(graph, name) for t in graph[m]}
    assert not loaded & {"transformers", "tokenizers", "safetensors"}, name
