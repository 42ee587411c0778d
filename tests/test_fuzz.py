"""Fuzzing the readers of files a user (or anyone) hands edgelora: the JSONL reader, the bundle
manifest (read by Bundle.open, and by `edgelora info` and `edgelora export` through the command
line), an adapted model's edgelora.json (read by `edgelora generate`) and the LoRA loader.
Whatever the bytes, nothing escapes but UserError: the commands end 0 or 2, never a traceback."""
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
    """Every key path into nested dicts (lists are replaced whole); of `files`, the bundle's hash
    list, only a few entries, so that the fields the commands read are drawn often."""
    out = []
    for k, v in obj.items():
        out.append(prefix + (k,))
        if isinstance(v, dict):
            out += paths(v, prefix + (k,))[: 6 if prefix + (k,) == ("files",) else None]
    return out


@pytest.fixture(scope="module")
def fuzz_bundle(tiny_bundle_ro, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("fuzz") / "bundle"
    shutil.copytree(tiny_bundle_ro, dst)
    return dst


@FUZZ
@given(st.data())
def test_manifest_reader(fuzz_bundle, data):
    manifest = mutate(data, json.loads((fuzz_bundle / "manifest.json").read_text()))
    mpath = fuzz_bundle / "manifest.json"
    original = mpath.read_bytes()
    try:
        mpath.write_text(json.dumps(manifest))
        only_user_errors(lambda: Bundle.open(fuzz_bundle))
    finally:
        mpath.write_bytes(original)


def mutate(data, obj: dict, only: tuple[str, ...] = ()) -> dict:
    """1 to 3 keys anywhere in `obj` (under the top-level keys `only`, where given) replaced by any
    JSON value or deleted."""
    for _ in range(data.draw(st.integers(1, 3))):
        where = [p for p in paths(obj) if not only or p[0] in only]
        if not where:
            break
        path = data.draw(st.sampled_from(where))
        parent = obj
        for k in path[:-1]:
            parent = parent[k]
        if data.draw(st.booleans()):
            parent[path[-1]] = data.draw(json_values)
        else:
            del parent[path[-1]]
    return obj


def exits_0_or_2(argv: list[str]) -> None:
    """`edgelora ARGV` in this process: done, or one line and exit 2; any other exception fails."""
    from edgelora.cli import main
    assert main(argv) in (0, 2), argv


@pytest.fixture(scope="module")
def fuzz_adapted(fuzz_bundle, tmp_path_factory) -> Path:
    """An adapt output (no model) made on the fuzz bundle, for `edgelora export` to read."""
    from edgelora.examples import Example
    from edgelora.outputs import write_outputs
    from edgelora.search import adapt
    bundle = Bundle.open(fuzz_bundle)
    rng = np.random.default_rng(1)
    L = bundle.arch["layers"]
    work = tmp_path_factory.mktemp("adapted")
    save_lora(work / "l.safetensors", Lora("l", 2, 4.0, {m: rng.normal(0, 0.1, (L, 2, t["in"])) for m, t in bundle.targets.items()},
                                           {m: rng.normal(0, 0.1, (L, t["out"], 2)) for m, t in bundle.targets.items()}))
    res = adapt([Example("What is 2 plus 3?", "5")], bundle, loras=[str(work / "l.safetensors")], budget=2,
                warn=lambda m: None)
    write_outputs(res, bundle, work / "done")
    return work


CLI_FUZZ = settings(FUZZ, max_examples=60)


@CLI_FUZZ
@given(st.data())
def test_manifest_through_info_and_export(fuzz_bundle, fuzz_adapted, data):
    """A damaged manifest as `edgelora info` and `edgelora export` (every format) read it: the
    fields they use beyond Bundle.open's (model type, head counts, sizes) included."""
    mpath = fuzz_bundle / "manifest.json"
    original = mpath.read_bytes()
    try:
        mpath.write_text(json.dumps(mutate(data, json.loads(original), ("base", "arch", "targets", "decoder"))))
        exits_0_or_2(["info", "--bundle", str(fuzz_bundle)])
        exits_0_or_2(["info", "--bundle", str(fuzz_bundle), "--json"])
        for fmt, name in (("peft", "p"), ("gguf", "a.gguf"), ("onnx-adapter", "a.onnx_adapter")):
            exits_0_or_2(["export", str(fuzz_adapted / "done"), "--format", fmt, "--bundle", str(fuzz_bundle),
                          "-o", str(fuzz_adapted / name)])
    finally:
        mpath.write_bytes(original)


WRONG_VALUES = [None, -1, 0, 3, 2.5, "x", [1], [{}], {"a": 1}]


def test_every_manifest_field_info_and_export_read(fuzz_bundle, fuzz_adapted):
    """Each field under base, arch, targets and decoder, alone, deleted or given each wrong value:
    `edgelora info` and `edgelora export` end 0 or 2 (the random fuzz above samples such cases;
    this tries every one)."""
    from edgelora.cli import main
    mpath = fuzz_bundle / "manifest.json"
    original = mpath.read_bytes()
    manifest = json.loads(original)
    cases = [p for p in paths(manifest) if p[0] in ("base", "arch", "targets", "decoder")]
    try:
        for path in cases:
            for value in ["<deleted>", *WRONG_VALUES]:
                mpath.write_text(json.dumps(mutated(original, path, value)))
                for argv in (["info", "--bundle", str(fuzz_bundle)],
                             *(["export", str(fuzz_adapted / "done"), "--format", fmt, "--bundle", str(fuzz_bundle),
                                "-o", str(fuzz_adapted / name)] for fmt, name in (("gguf", "a.gguf"),
                                                                                  ("onnx-adapter", "a.onnx_adapter")))):
                    try:
                        code = main(argv)
                    except Exception as e:  # noqa: BLE001 - the failure names the case
                        raise AssertionError(f"{'.'.join(path)} = {value!r}: {argv[0]} raised {e!r}") from e
                    assert code in (0, 2), (path, value, argv[0], code)
    finally:
        mpath.write_bytes(original)


def mutated(original: bytes, path: tuple, value) -> dict:
    """The JSON `original` with the field at `path` deleted ("<deleted>") or set to `value`."""
    m = json.loads(original)
    parent = m
    for k in path[:-1]:
        parent = parent[k]
    if value == "<deleted>":
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return m


@pytest.fixture(scope="module")
def fuzz_model(fuzz_bundle, tmp_path_factory) -> Path:
    """An adapted model folder (the base, written back at int8) whose edgelora.json is fuzzed."""
    from edgelora.writeback import write_model
    out = tmp_path_factory.mktemp("model") / "m"
    write_model(Bundle.open(fuzz_bundle), None, None, out, "int8")
    return out


def test_every_model_meta_field_generate_reads(fuzz_model):
    """Each field of an adapted model's edgelora.json, alone, deleted or given each wrong value:
    `edgelora generate` ends 0 or 2."""
    from edgelora.cli import main
    mpath = fuzz_model / "edgelora.json"
    original = mpath.read_bytes()
    try:
        for path in paths(json.loads(original)):
            for value in ["<deleted>", *WRONG_VALUES]:
                mpath.write_text(json.dumps(mutated(original, path, value)))
                try:
                    code = main(["generate", str(fuzz_model), "hi", "--max-new-tokens", "2"])
                except Exception as e:  # noqa: BLE001 - the failure names the case
                    raise AssertionError(f"{'.'.join(path)} = {value!r}: generate raised {e!r}") from e
                assert code in (0, 2), (path, value, code)
    finally:
        mpath.write_bytes(original)


@CLI_FUZZ
@given(st.data())
def test_model_meta_through_generate(fuzz_model, data):
    """A damaged edgelora.json (stop ids, prompt format, limits, hashes) as `edgelora generate` reads it."""
    mpath = fuzz_model / "edgelora.json"
    original = mpath.read_bytes()
    try:
        mpath.write_text(json.dumps(mutate(data, json.loads(original))))
        exits_0_or_2(["generate", str(fuzz_model), "hi", "--max-new-tokens", "2"])
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
