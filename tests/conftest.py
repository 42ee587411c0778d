"""Builds one tiny random Llama (HF folder) and its bundle per test session: real export,
real onnxruntime, in well under a minute."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny import build_tiny_llama  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def edgelora_home(tmp_path_factory) -> Path:
    """EDGELORA_HOME (the hash cache, the default bundle) in a temporary folder, never the
    user's; subprocesses inherit it."""
    home = tmp_path_factory.mktemp("home")
    os.environ["EDGELORA_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "hf")


@pytest.fixture(scope="session")
def tiny_bundle_ro(tiny_hf, tmp_path_factory) -> Path:
    from edgelora_export.base import export_base
    return export_base(tiny_hf, tmp_path_factory.mktemp("bundle") / "b", ["q_proj", "v_proj"], log=lambda *_: None)


@pytest.fixture
def tiny_bundle(tiny_bundle_ro, tmp_path) -> Path:
    """A private copy, for tests that add LoRAs or break files."""
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_ro, dst)
    return dst


@pytest.fixture(scope="session")
def train_base(tiny_hf):
    from edgelora_export.train import load_for_training
    return load_for_training(str(tiny_hf))


@pytest.fixture(scope="session")
def colors(tmp_path_factory) -> Path:
    """A small upstream-like task for the trainer: 40 questions, 7 answers."""
    f = tmp_path_factory.mktemp("task") / "colors.jsonl"
    names = ["red", "green", "blue", "orange", "purple", "white", "black"]
    f.write_text("".join(json.dumps({"input": f"What is colour {i}?", "output": names[i % 7]}) + "\n" for i in range(40)))
    return f
