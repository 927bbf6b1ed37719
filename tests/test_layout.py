"""The house's layout rules that a reader relies on: one-way imports (no cycles, lazy imports counted)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _modules(roots: list[tuple[Path, Path]]) -> dict[str, Path]:
    out = {}
    for folder, base in roots:
        for file in folder.rglob("*.py"):
            name = ".".join(file.relative_to(base).with_suffix("").parts).removesuffix(".__init__")
            out[name] = file
    return out


def import_graph(roots: list[tuple[Path, Path]]) -> dict[str, set[str]]:
    """Module -> the modules it imports, at the top or inside a function (a lazy import is still a dependency).
    ``from pkg import submodule`` depends on the submodule, not on everything ``pkg/__init__`` does."""
    modules = _modules(roots)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, file in modules.items():
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
                targets = subs + ([node.module] if len(subs) < len(node.names) else [])
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    """Each module can be read knowing only what it imports: e.g. the filters do not import their registry."""
    graph = import_graph([(REPO / "src" / "mole", REPO / "src"), (REPO / "bench", REPO)])
    assert graph["mole.data.quality"] and "mole.data.quality" in graph["mole.data.filtering"]
    assert "bench.common" in graph["bench.gpu_stage1"] and "bench.common" in graph["bench.train_throughput"]
    assert cycles(graph) == []


def test_models_uris_are_parsed_in_one_place() -> None:
    from mole.uris import ModelURI, is_model_uri, model_version, parse_model_uri

    assert parse_model_uri("models:/mole/7") == ModelURI("mole", "7")
    assert parse_model_uri("models:/mole@champion") == ModelURI("mole", alias="champion")
    assert str(parse_model_uri("models:/mole@champion")) == "models:/mole@champion"
    assert parse_model_uri("out/stage1") is None and parse_model_uri("runs:/abc/model") is None
    assert is_model_uri("models:/mole/1") and not is_model_uri("/models/x")
    assert model_version("models:/mole-stage1/3").version == "3"
    with pytest.raises(ValueError, match="baseline must look like models:/NAME/VERSION"):
        model_version("models:/mole@champion", "baseline")
    pattern = re.compile(r"""models:/\(\[\^/@\]""")  # a hand-written models:/ regex outside mole/uris.py
    for file in (REPO / "src" / "mole").rglob("*.py"):
        if file.name != "uris.py":
            assert not pattern.search(file.read_text(encoding="utf-8")), file


def test_name_value_arguments_are_split_in_one_place() -> None:
    from mole.pairs import parse_pairs, split_pair
    from mole.pipeline.run import parse_experts, parse_params
    from mole.train.config import ConfigError, parse_overrides

    assert parse_pairs([" face = /a=b ", "hand=/b"], "--experts") == {"face": "/a=b", "hand": "/b"}
    for bad, message in (("face", "must look like NAME=VALUE"), ("=x", "must look like"), ("face=", "must look")):
        with pytest.raises(ValueError, match=message):
            parse_pairs([bad], "--experts")
    with pytest.raises(ValueError, match="'face' is given twice"):
        parse_pairs(["face=/a", "face=/b"], "--experts")
    assert split_pair("k= v ", "p", strip_value=False) == ("k", " v ")
    # Every caller goes through it: the same wording wherever a pair is malformed.
    with pytest.raises(ConfigError, match=r"override must look like section\.key=value"):
        parse_overrides(["stage1.max_steps"])
    with pytest.raises(ValueError, match="pipeline parameter must look like KEY=VALUE"):
        parse_params(["gpus"], {"gpus": {"parameterType": "NUMBER_INTEGER"}})
    assert parse_params(["prompts= a b"], {"prompts": {}}) == {"prompts": " a b"}  # strings as given
    assert parse_experts(["face", "feet=feet", "hand=hands"]) == {"face": "faces", "feet": "feet", "hand": "hands"}


def test_tracking_does_not_import_the_service() -> None:
    """The pyfunc model lives with serving (mole.serve.pyfunc); logging it must not pull in FastAPI."""
    code = (
        "import sys, mole.tracking; "
        "bad = [m for m in ('fastapi', 'uvicorn', 'mole.serve.app', 'mole.serve.service') if m in sys.modules]; "
        "assert not bad, bad; from mole.serve import ServiceSettings, make_loader; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_every_mole_import_names_something_that_exists() -> None:
    """Lazy imports inside functions are not checked by ruff: after a move, `from mole.x import y` must still
    find y (a missing name surfaces only when that code path runs, e.g. in a worker process)."""
    import importlib

    missing = []
    files = [*(REPO / "src" / "mole").rglob("*.py"), *(REPO / "bench").rglob("*.py"), *(REPO / "tests").glob("*.py")]
    for file in files:
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("mole"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    if not hasattr(module, alias.name):
                        try:
                            importlib.import_module(f"{node.module}.{alias.name}")
                        except ModuleNotFoundError:
                            missing.append(f"{file.relative_to(REPO)}:{node.lineno} {node.module}.{alias.name}")
    assert not missing, missing


def test_mode_names_have_one_home() -> None:
    """The layer's run modes are the service's modes and the request schema's (one list, poorest first)."""
    from typing import get_args

    from mole.layers import RUN_MODES, RunMode
    from mole.serve import schemas, service

    assert RUN_MODES == ("base", "experts", "mole") == get_args(RunMode)
    assert service.MODES is RUN_MODES and schemas.Mode is RunMode


def test_the_cli_is_one_module_per_sub_app() -> None:
    """`mole` keeps every command after the split into mole/cli/; each module stays small."""
    import typer.main

    from mole.cli import app

    group = typer.main.get_command(app)
    assert set(group.commands) == {"generate", "serve", "lineage", "promote", "tiny", "train", "curate", "prompts",
                                   "evaluate", "pipeline", "study"}  # fmt: skip
    assert set(group.commands["train"].commands) == {"stage1", "expert", "gates"}
    assert {"scenes", "faces", "hands", "train-filter"} <= set(group.commands["curate"].commands)
    for module in (REPO / "src" / "mole" / "cli").glob("*.py"):
        assert len(module.read_text(encoding="utf-8").splitlines()) < 300, module


def test_curation_and_scorers_tokenize_without_the_toy_model() -> None:
    """The CLIP tokenizer pieces live in mole.tokenizer; captions and the scorers do not import mole.tiny."""
    graph = import_graph([(REPO / "src" / "mole", REPO / "src")])
    for module in ("mole.data.captions", "mole.evaluate.scorers.openai_clip"):
        assert "mole.tokenizer" in graph[module] and "mole.tiny" not in graph[module], module
    assert "mole.tokenizer" in graph["mole.tiny"]
