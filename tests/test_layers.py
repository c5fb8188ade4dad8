"""The package's structure, as issue 25 states it: layers that only look downward (the import-linter
contracts of pyproject.toml), and imports inside functions only for heavy third-party modules, each
with its reason on the line."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "axolotl_focus"
# third-party modules heavy enough (import time, or an optional extra) to be imported where they are used
HEAVY = {"accelerate", "axolotl", "bert_score", "datasets", "deepspeed", "gguf", "huggingface_hub", "liger_kernel",
         "lm_eval", "mauve", "matplotlib", "numpy", "peft", "pyarrow", "safetensors", "scipy", "tokenizers", "torch",
         "transformers"}


def _env() -> dict:
    """This process's environment with the checkout first on the import path."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _function_imports(tree: ast.AST):
    """Groups of consecutive import statements inside function bodies."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for body in _bodies(node):
                group: list = []
                for stmt in body + [None]:
                    if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                        group.append(stmt)
                    elif group:
                        yield group
                        group = []


def _bodies(function):
    """The statement lists of a function (its body and the nested blocks), not of nested functions."""
    todo = [function.body]
    while todo:
        body = todo.pop()
        yield body
        for stmt in body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            for name in ("body", "orelse", "finalbody"):
                if isinstance(getattr(stmt, name, None), list):
                    todo.append(getattr(stmt, name))
            for handler in getattr(stmt, "handlers", []):
                todo.append(handler.body)


def _reason(lines: list[str], group) -> bool:
    """A comment other than a bare ``noqa`` on the group's lines or on a comment line just above."""
    above = lines[group[0].lineno - 2].strip().startswith("#")
    for lineno in range(group[0].lineno - above, group[-1].end_lineno + 1):
        comment = lines[lineno - 1].partition("#")[2]
        if re.sub(r"noqa(: *[A-Z0-9, ]+)?", "", comment).strip(" -"):
            return True
    return False


def test_imports_inside_functions_are_heavy_third_party_with_a_reason():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        lines, where = text.splitlines(), path.relative_to(ROOT)
        for group in _function_imports(ast.parse(text)):
            for stmt in group:
                if isinstance(stmt, ast.ImportFrom) and (stmt.level or (stmt.module or "").startswith("axolotl_focus")):
                    problems.append(f"{where}:{stmt.lineno}: a module of the package imported inside a function")
                    continue
                names = [stmt.module] if isinstance(stmt, ast.ImportFrom) else [a.name for a in stmt.names]
                light = [n for n in names if n.split(".")[0] not in HEAVY]
                if light:
                    problems.append(f"{where}:{stmt.lineno}: {', '.join(light)} imported inside a function "
                                    "(only heavy third-party modules are)")
            if not _reason(lines, group):
                problems.append(f"{where}:{group[0].lineno}: an import inside a function without its reason")
    assert not problems, "\n".join(problems)


def test_the_layers_and_the_independent_stages_hold():
    """pyproject.toml's import-linter contracts: shared modules at the bottom, the four stages above
    them importing none of each other, the drivers (preflight, plugin, demo, cli) on top; no cycle."""
    lint = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    if not Path(lint).exists():
        pytest.skip("import-linter is not installed (the `test` extra)")
    proc = subprocess.run([lint, "--no-cache", "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_pruned_checkpoint_class_spells_the_shared_shape_keys():
    """prune/modeling_pruned_llama.py is copied into every width-pruned checkpoint and imports nothing
    of the package; its SHAPE_KEYS (the keys of config.json's layer_shapes) are prune/common's."""
    from axolotl_focus.prune import common, modeling_pruned_llama

    assert modeling_pruned_llama.SHAPE_KEYS == common.SHAPE_KEYS
    source = Path(modeling_pruned_llama.__file__).read_text(encoding="utf-8")
    assert "axolotl_focus" not in "".join(line for line in source.splitlines() if line.lstrip().startswith(
        ("import ", "from ")))


@pytest.mark.parametrize("module", ["axolotl_focus.modeling_pruned_llama", "axolotl_focus.prune.modeling_pruned_llama"])
def test_the_pruned_model_module_imports_first_in_a_fresh_process(module):
    """The pruned model module may be the first import of a process, before transformers: the Auto
    classes learn its classes once they exist (the import hook of axolotl_focus/__init__.py would
    otherwise ask for them while the module is still being imported)."""
    code = (f"import {module} as m\nfrom transformers import LlamaConfig\n"
            "from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING as table\n"
            "print(table[LlamaConfig].__name__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0 and proc.stdout.split()[-1] == "LlamaOrPrunedLlamaForCausalLM", proc.stderr[-3000:]
