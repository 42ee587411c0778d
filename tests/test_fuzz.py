"""Fuzzing the three readers of files a user (or anyone) hands edgelora: the JSONL reader, the
bundle manifest reader and the LoRA loader. Whatever the bytes, nothing escapes but UserError."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgelora.bundle import Bundle
from edgelora.errors import UserError
from edgelora.examples import load_examples
from edgelora.lora import Lora, check_compatible, load_lora, save_lora

FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=12)
maybe_strings = st.text(max_size=12) | json_values
examples = st.fixed_dictionaries({"input": maybe_strings, "output": maybe_strings},
                                 optional={"options": st.lists(maybe_strings, max_size=3) | json_values,
                                           "aliases": st.lists(maybe_strings, max_size=3) | json_values})
lines = st.one_of(examples.map(json.dumps), json_values.map(json.dumps), st.text(max_size=40))
line_ends = st.sampled_from(["\n", "\r\n", "\r", "\u2028", ""])


def only_user_errors(fn) -> None:
    try:
        fn()
    except UserError:
        pass


@FUZZ
@given(st.lists(st.tuples(lines, line_ends), max_size=6), st.booleans())
def test_jsonl_reader(tmp_path, rows, bom):
    f = tmp_path / "ex.jsonl"
    text = "".join(line + end for line, end in rows)
    f.write_bytes(("\ufeff" if bom else "").encode() + text.encode("utf-8", "surrogatepass"))
    only_user_errors(lambda: load_examples(f, warn=lambda m: None))


@FUZZ
@given(st.binary(max_size=300))
def test_jsonl_reader_bytes(tmp_path, data):
    f = tmp_path / "ex.jsonl"
    f.write_bytes(data)
    only_user_errors(lambda: load_examples(f, warn=lambda m: None))


def paths(obj, prefix=()) -> list[tuple]:
    """Every key path into nested dicts (lists are replaced whole)."""
    out = []
    for k, v in obj.items():
        out.append(prefix + (k,))
        if isinstance(v, dict):
            out += paths(v, prefix + (k,))
    return out


@pytest.fixture(scope="module")
def fuzz_bundle(tiny_bundle_ro, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("fuzz") / "bundle"
    shutil.copytree(tiny_bundle_ro, dst)
    return dst


@FUZZ
@given(st.data())
def test_manifest_reader(fuzz_bundle, data):
    manifest = json.loads((fuzz_bundle / "manifest.json").read_text())
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths(manifest)))
        parent = manifest
        for k in path[:-1]:
            parent = parent[k]
        if data.draw(st.booleans()):
            parent[path[-1]] = data.draw(json_values)
        else:
            del parent[path[-1]]
    mpath = fuzz_bundle / "manifest.json"
    original = mpath.read_bytes()
    try:
        mpath.write_text(json.dumps(manifest))
        only_user_errors(lambda: Bundle.open(fuzz_bundle))
    finally:
        mpath.write_bytes(original)


@FUZZ
@given(st.binary(max_size=200))
def test_manifest_reader_bytes(fuzz_bundle, raw):
    mpath = fuzz_bundle / "manifest.json"
    original = mpath.read_bytes()
    try:
        mpath.write_bytes(raw)
        only_user_errors(lambda: Bundle.open(fuzz_bundle))
    finally:
        mpath.write_bytes(original)


@pytest.fixture(scope="module")
def valid_lora(fuzz_bundle, tmp_path_factory) -> tuple[Bundle, bytes]:
    bundle = Bundle.open(fuzz_bundle)
    rng = np.random.default_rng(0)
    L = bundle.arch["layers"]
    A = {m: rng.normal(0, 0.1, (L, 2, t["in"])).astype(np.float16) for m, t in bundle.targets.items()}
    B = {m: rng.normal(0, 0.1, (L, t["out"], 2)).astype(np.float16) for m, t in bundle.targets.items()}
    path = tmp_path_factory.mktemp("lora") / "valid.safetensors"
    save_lora(path, Lora("valid", 2, 4.0, A, B))
    return bundle, path.read_bytes()


def load_and_check(bundle: Bundle, path: Path) -> None:
    check_compatible(load_lora(path), bundle.targets, bundle.arch["layers"], str(path))


@FUZZ
@given(st.data())
def test_lora_loader_mutated_bytes(valid_lora, tmp_path, data):
    bundle, raw = valid_lora
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] = data.draw(st.integers(0, 255))
    buf = buf[: data.draw(st.integers(0, len(buf)))]
    path = tmp_path / "x.safetensors"
    path.write_bytes(bytes(buf))
    only_user_errors(lambda: load_and_check(bundle, path))


headers = st.dictionaries(
    st.sampled_from(["q_proj.A", "q_proj.B", "v_proj.A", "v_proj.B", "k_proj.A", "x", "q_proj.C"]),
    st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "F16", "BF16", "I8", "U8", "BOOL", "F64", "XX"]),
                           "shape": st.lists(st.integers(0, 70), max_size=4),
                           "data_offsets": st.lists(st.integers(0, 5000), min_size=2, max_size=2)}),
    max_size=4)
metadata = st.dictionaries(st.sampled_from(["format", "rank", "alpha", "name"]),
                           st.sampled_from(["edgelora-lora", "4", "-1", "0", "nan", "inf", "x", "2.5"]), max_size=4)


@FUZZ
@given(headers, metadata, st.integers(0, 5000))
def test_lora_loader_forged_headers(valid_lora, tmp_path, header, meta, n_bytes):
    bundle, _ = valid_lora
    head = json.dumps({**header, "__metadata__": meta}).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(head)) + head + bytes(n_bytes))
    only_user_errors(lambda: load_and_check(bundle, path))
