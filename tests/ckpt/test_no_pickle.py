"""The checkpoint package never unpickles: no pickle, no torch.load, anywhere in its source."""

from __future__ import annotations

import ast
from pathlib import Path

import gradguard.ckpt

SOURCES = sorted(Path(gradguard.ckpt.__file__).parent.glob("*.py"))
FORBIDDEN_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
FORBIDDEN_CALLS = {"load", "loads"}  # on torch / pickle-like modules


def test_no_source_file_imports_a_pickle_module() -> None:
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not {n.split(".")[0] for n in names} & FORBIDDEN_MODULES, path.name


def test_no_source_file_calls_torch_load() -> None:
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr in FORBIDDEN_CALLS
                    and isinstance(node.value, ast.Name) and node.value.id == "torch"):
                raise AssertionError(f"{path.name}:{node.lineno} calls torch.{node.attr}")
