"""The bad-input matrix: every case a user can hand edgelora by mistake (or an attacker on
purpose), run through the command line. Each must end with one line on stderr naming the file
and the problem, exit code 2, no traceback, and nothing half-written.

One case of the issue's list is not refused: a LoRA covering only some of the bundle's targets
is a valid LoRA (the others stay as the base has them); test_reliability.py adapts with one."""
from __future__ import annotations

import json
import resource
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from edgelora.bundle import Bundle
from edgelora.lora import Lora

PROMPTS = ["What is 2 plus 3?", "red green blue", "Today is 01/02/1987."]
GOOD = "".join(json.dumps({"input": p, "output": "yes"}) + "\n" for p in PROMPTS)


def lora_file(bundle: Path, path: Path, layers: int | None = None, modules=("q_proj", "v_proj"),
              fill: float | None = None) -> Path:
    """A random edgelora LoRA for the tiny bundle (or, with `layers`, for another base)."""
    b = Bundle.open(bundle)
    L = layers or b.arch["layers"]
    rng = np.random.default_rng(0)
    t = {**b.targets, "k_proj": {"in": 64, "out": 32}}
    A = {m: rng.normal(0, 0.1, (L, 4, t[m]["in"])).astype(np.float32) for m in modules}
    B = {m: rng.normal(0, 0.1, (L, t[m]["out"], 4)).astype(np.float32) for m in modules}
    if fill is not None:
        A[modules[0]][0, 0, 0] = fill
    tensors = {f"{m}.{ab}": t[m] for m in modules for ab, t in (("A", A), ("B", B))}
    save_file(tensors, path, metadata=Lora("x", 4, 8.0, A, B).metadata())  # as forged: no prototypes
    return path


def adapt_args(tmp: Path, bundle: Path, *extra: str, examples: str | bytes = GOOD) -> list[str]:
    f = tmp / "ex.jsonl"
    f.write_bytes(examples.encode() if isinstance(examples, str) else examples)
    return ["adapt", str(f), "--bundle", str(bundle), "--out", str(tmp / "out"), "--budget", "2", *extra]


def jsonl(text: str | bytes):
    return lambda tmp, bundle: adapt_args(tmp, bundle, examples=text)


def with_lora(make):
    """adapt with --loras naming the file `make(tmp, bundle, path)` writes."""
    def setup(tmp, bundle):
        return adapt_args(tmp, bundle, "--loras", str(make(tmp, bundle, tmp / "bad.safetensors")))
    return setup


def raw_bytes(data_fn):
    def make(tmp, bundle, path):
        path.write_bytes(data_fn(lora_file(bundle, tmp / "good.safetensors").read_bytes()))
        return path
    return make


def lying_header(_valid: bytes) -> bytes:
    header = json.dumps({"__metadata__": {"format": "edgelora-lora", "rank": "4", "alpha": "8"},
                         "q_proj.A": {"dtype": "F32", "shape": [2, 4, 64], "data_offsets": [0, 1 << 20]},
                         "q_proj.B": {"dtype": "F32", "shape": [2, 32, 4], "data_offsets": [0, 1024]}}).encode()
    return struct.pack("<Q", len(header)) + header + bytes(1024)


def edit_manifest(change):
    def setup(tmp, bundle):
        m = json.loads((bundle / "manifest.json").read_text())
        change(m)
        (bundle / "manifest.json").write_text(json.dumps(m))
        return ["info", "--bundle", str(bundle)]
    return setup


def wrong_hash(m):
    m["files"]["tokenizer.json"]["sha256"] = "0" * 64


def escaping_lora(m):
    m["files"]["loras/../../evil.safetensors"] = {"sha256": "0" * 64, "size": 1}


def broken_manifest(tmp, bundle):
    (bundle / "manifest.json").write_text('{"format": ')
    return ["info", "--bundle", str(bundle)]


def good_lora_then(*extra: str):
    def setup(tmp, bundle):
        return adapt_args(tmp, bundle, "--loras", str(lora_file(bundle, tmp / "good.safetensors")), *extra)
    return setup


def out_under_a_file(tmp, bundle):
    (tmp / "afile").write_text("")
    args = good_lora_then()(tmp, bundle)
    args[args.index("--out") + 1] = str(tmp / "afile" / "out")
    return args


# The adapt outputs the cases below only read (or break a copy of): made once per module, by
# `adapted_outputs`, on the read-only bundle, so that each case does not pay a search and a write-back.
SHARED: dict[str, Path] = {}


@pytest.fixture(scope="module")
def adapted_outputs(tiny_bundle_ro, tmp_path_factory) -> dict[str, Path]:
    from edgelora.outputs import write_outputs
    from edgelora.search import adapt
    work = tmp_path_factory.mktemp("adapted")
    (work / "ex.jsonl").write_text(GOOD)
    lora = lora_file(tiny_bundle_ro, work / "good.safetensors")
    res = adapt(work / "ex.jsonl", tiny_bundle_ro, loras=[str(lora)], budget=2, warn=lambda m: None)
    bundle = Bundle.open(tiny_bundle_ro)
    write_outputs(res, bundle, work / "model", "int8")
    write_outputs(res, bundle, work / "nomodel")
    return {"model": work / "model", "nomodel": work / "nomodel"}


def adapt_then_break(breaks):
    """A copy of a complete adapt output (with its model), then `breaks` applied to it."""
    def setup(tmp, bundle):
        shutil.copytree(SHARED["model"], tmp / "done")
        breaks(tmp / "done")
        return ["generate", str(tmp / "done"), "hi"]
    return setup


def adapted_then_export(*extra: str):
    """A copy of a complete adapt output without a model, then `edgelora export` of it with `extra`;
    `{tmp}` in `extra` is the work folder."""
    def setup(tmp, bundle):
        shutil.copytree(SHARED["nomodel"], tmp / "done")
        (tmp / "afile").write_text("")
        return ["export", str(tmp / "done"), *(a.format(tmp=tmp) for a in extra)]
    return setup


def edit_model_meta(change):
    """A complete adapt output whose edgelora.json `change` edits (by hand, or damaged)."""
    def breaks(done):
        meta = json.loads((done / "edgelora.json").read_text())
        change(meta)
        (done / "edgelora.json").write_text(json.dumps(meta))
    return adapt_then_break(breaks)


def cli_args(*args: str):
    """edgelora ARGS as given; `{tmp}` is the work folder and `{bundle}` the bundle."""
    return lambda tmp, bundle: [a.format(tmp=tmp, bundle=bundle) for a in args]


def export_not_adapted(tmp, bundle):
    (tmp / "folder").mkdir()
    return ["export", str(tmp / "folder"), "--format", "peft"]


def remove_decoder(tmp, bundle):
    (bundle / "decoder" / "model.onnx").unlink()
    return ["generate", str(bundle), "hi"]


FILE_TOO_BIG = 4096  # bytes: RLIMIT_FSIZE for the "disk full" case, under the adapter's size

# (case, setup(tmp, bundle) -> edgelora arguments, words the one line must hold)
CASES = [
    ("jsonl: bad JSON", jsonl("not json\n"), ["ex.jsonl:1", "not valid JSON"]),
    ("jsonl: wrong type", jsonl('{"input": "a", "output": 3}\n'), ["ex.jsonl:1", "'output' must be a string"]),
    ("jsonl: options not a list", jsonl('{"input": "a", "output": "b", "options": "b"}\n'),
     ["ex.jsonl:1", "'options' must be a list"]),
    ("jsonl: missing field", jsonl(GOOD + '{"output": "b"}\n'), ["ex.jsonl:4", "missing field 'input'"]),
    ("jsonl: empty file", jsonl(""), ["ex.jsonl", "no examples"]),
    ("jsonl: blank lines only", jsonl("\n  \r\n"), ["ex.jsonl", "no examples"]),
    ("jsonl: not an object", jsonl("[1, 2]\n"), ["ex.jsonl:1", "expected a JSON object"]),
    ("jsonl: huge line", jsonl(json.dumps({"input": "x" * (1 << 21), "output": "b"}) + "\n"),
     ["ex.jsonl:1", "the limit is 1,048,576"]),
    ("jsonl: not UTF-8", jsonl(b'{"input": "caf\xe9", "output": "b"}\n'), ["ex.jsonl", "not UTF-8"]),
    ("jsonl: NaN", jsonl('{"input": "a", "output": "b", "score": NaN}\n'), ["ex.jsonl:1", "NaN is not a JSON value"]),
    ("jsonl: Infinity", jsonl(GOOD + '{"input": "a", "output": "b", "w": -Infinity}\n'),
     ["ex.jsonl:4", "-Infinity is not a JSON value"]),
    ("jsonl: deep nesting", jsonl("[" * 100000 + "\n"), ["ex.jsonl:1", "not valid JSON (nested too deeply)"]),
    ("jsonl: examples x tokens over the cap",
     jsonl("".join(json.dumps({"input": f"{i} " + "the quick brown fox " * 30, "output": "b"}) + "\n" for i in range(200))),
     ["ex.jsonl", "the limit is 16,384"]),
    ("lora: wrong shape", with_lora(lambda t, b, p: lora_file(b, p, layers=3)), ["bad.safetensors", "q_proj has A (3, 4, 64)"]),
    ("lora: wrong target", with_lora(lambda t, b, p: lora_file(b, p, modules=("k_proj",))),
     ["bad.safetensors", "module k_proj is not a LoRA target"]),
    ("lora: NaN", with_lora(lambda t, b, p: lora_file(b, p, fill=float("nan"))), ["bad.safetensors", "NaN or infinite"]),
    ("lora: inf", with_lora(lambda t, b, p: lora_file(b, p, fill=float("inf"))), ["bad.safetensors", "NaN or infinite"]),
    ("lora: not safetensors", with_lora(raw_bytes(lambda d: b"PK\x03\x04 a zip, not a LoRA" * 10)),
     ["bad.safetensors", "not a readable safetensors file"]),
    ("lora: truncated", with_lora(raw_bytes(lambda d: d[: len(d) // 2])), ["bad.safetensors", "not a readable safetensors"]),
    ("lora: header lies about offsets", with_lora(raw_bytes(lying_header)), ["bad.safetensors", "not a readable safetensors"]),
    ("lora: not an edgelora LoRA", with_lora(raw_bytes(lambda d: d.replace(b"edgelora-lora", b"edgelora-xxxx"))),
     ["bad.safetensors", "not an edgelora LoRA"]),
    ("lora: name leaves the bundle", good_lora_then("--loras", "../../etc/passwd"), ["no LoRA named ../../etc/passwd"]),
    ("manifest: a file name leaves the bundle", edit_manifest(escaping_lora), ["manifest.json", "leaves the bundle folder"]),
    ("manifest: wrong hash", edit_manifest(wrong_hash), ["tokenizer.json", "sha256 differs", "manifest.json"]),
    ("manifest: unknown format version", edit_manifest(lambda m: m.update(format_version=99)),
     ["manifest.json", "bundle format 99 is not supported"]),
    ("manifest: wrong type", edit_manifest(lambda m: m["arch"].update(layers="2")), ["manifest.json", "arch.layers must be a positive integer"]),
    ("manifest: not JSON", broken_manifest, ["manifest.json:1", "not valid JSON"]),
    ("manifest: no base.model_type", edit_manifest(lambda m: m["base"].pop("model_type")),
     ["manifest.json", "lacks base.model_type"]),
    ("manifest: no arch.hidden", edit_manifest(lambda m: m["arch"].pop("hidden")), ["manifest.json", "lacks arch.hidden"]),
    ("manifest: no arch.heads", edit_manifest(lambda m: m["arch"].pop("heads")), ["manifest.json", "lacks arch.heads"]),
    ("manifest: eos_ids not integers", edit_manifest(lambda m: m.update(eos_ids=[{}])), ["manifest.json", "eos_ids"]),
    ("manifest: arch.heads 0", edit_manifest(lambda m: m["arch"].update(heads=0)),
     ["manifest.json", "arch.heads must be a positive integer"]),
    ("adapt: negative --seed", good_lora_then("--select", "random", "--seed", "-1"), ["--seed -1", "0 or more"]),
    ("adapt: --l1 nan", good_lora_then("--l1", "nan"), ["--l1 nan", "finite"]),
    ("adapt: --l1 inf", good_lora_then("--l1", "inf"), ["--l1 inf", "finite"]),
    ("adapt: --bounds nan", good_lora_then("--bounds", "nan"), ["--bounds nan", "finite"]),
    ("generate: negative --seed", cli_args("generate", "{bundle}", "hi", "--seed", "-1"), ["--seed -1", "0 or more"]),
    ("generate: --temperature nan", cli_args("generate", "{bundle}", "hi", "--temperature", "nan"),
     ["--temperature nan"]),
    ("generate: --top-p 0", cli_args("generate", "{bundle}", "hi", "--top-p", "0"), ["--top-p 0"]),
    ("cluster: negative --seed", cli_args("cluster", "--bundle", "{bundle}", "--seed", "-1", "-o", "{tmp}/c.json"),
     ["--seed -1", "0 or more"]),
    ("model: eos_ids not integers", edit_model_meta(lambda m: m.update(eos_ids=[{}])), ["edgelora.json", "eos_ids"]),
    ("model: max_len not positive", edit_model_meta(lambda m: m.update(max_len=0)),
     ["edgelora.json", "max_len must be a positive integer"]),
    ("output: folder not writable", out_under_a_file, ["afile/out", "cannot write here", "not a writable folder"]),
    ("output: disk full", good_lora_then("--json"), ["out", "cannot write the output", "File too large"]),
    ("model: missing model file", adapt_then_break(lambda d: (d / "model.onnx").unlink()), ["model.onnx", "missing"]),
    ("model: damaged model file", adapt_then_break(lambda d: (d / "model.onnx").write_bytes(b"x")), ["model.onnx", "sha256"]),
    ("bundle: missing model file", remove_decoder, ["decoder/model.onnx", "missing"]),
    ("export: not an adapt output", export_not_adapted, ["folder", "not an `edgelora adapt` output"]),
    ("export: unknown format", adapted_then_export("--format", "zip"), ["--format zip", "peft, gguf, onnx-adapter"]),
    ("export: output not writable", adapted_then_export("--format", "gguf", "-o", "{tmp}/afile/a.gguf"),
     ["afile/a.gguf", "cannot write here", "not a writable folder"]),
    ("export: peft output not writable", adapted_then_export("--format", "peft", "-o", "{tmp}/afile/peft"),
     ["afile/peft", "cannot write here"]),
    ("export: output is a folder", adapted_then_export("--format", "onnx-adapter", "-o", "{tmp}/done"),
     ["done", "is a folder"]),
    ("export: output is a file edgelora did not write", adapted_then_export("--format", "gguf", "-o", "{tmp}/afile"),
     ["afile", "was not written by edgelora", "--force"]),
    ("export: bundle missing", adapted_then_export("--format", "gguf", "--bundle", "{tmp}/nobundle"),
     ["nobundle", "not a bundle"]),
]


def limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_TOO_BIG, FILE_TOO_BIG))


@pytest.mark.parametrize("case,setup,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, setup, words, tiny_bundle, tmp_path, adapted_outputs):
    SHARED.update(adapted_outputs)
    work = tmp_path / "work"
    work.mkdir()
    args = setup(work, tiny_bundle)
    before = sorted(p.name for p in work.iterdir())
    r = subprocess.run([sys.executable, "-m", "edgelora.cli", *args], capture_output=True, text=True, cwd=work,
                       preexec_fn=limit_file_size if case == "output: disk full" else None)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    for w in words:
        assert w in lines[0], lines[0]
    assert sorted(p.name for p in work.iterdir()) == before, "something was left half-written"
