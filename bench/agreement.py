"""Do the adapted model's greedy answers agree across runtimes? (issue 17)

One adapted model, made as a user makes it (`edgelora adapt examples/date_understanding.jsonl`,
default settings: int4, the LoRA merged, its targets at 8 bits), also written back as fp32
(`quant="none"`, the same merged weights) and exported as a llama.cpp GGUF LoRA
(`formats.export(..., "gguf")`). 20 prompts (the first 5 test questions of 4 bbh/ tasks) are
formatted with the bundle's prompt format and tokenized once; every runtime gets those token
ids (llama.cpp too: `Llama.eval` on ids, never text) and decodes greedily, up to 32 new
tokens, stopping at the bundle's EOS ids:

    edgelora-int4   edgelora's Decoder on the adapted int4 folder (what `edgelora generate` runs)
    edgelora-fp32   the same on the fp32 write-back of the same weights
    genai-int4      onnxruntime-genai on the adapted int4 folder itself (og.Model(folder))
    llamacpp-lora   llama.cpp: the base Q4_1 GGUF + the exported GGUF LoRA (unmerged, f32)
    llamacpp-base   llama.cpp: the base GGUF alone (control)
    edgelora-base   edgelora on the bundle's fp32 base, no LoRA (control)

The bundle's fp32 base is that Q4_1 GGUF dequantized, so edgelora-fp32 and llamacpp-lora hold
the same weights; llama.cpp still rounds activations to 8 bits in its Q4_1 dot products.
For each pair: prompts with identical token sequences, with an identical first line (what
exact match reads, `evaluate.normalize`), and the mean position of the first differing token
over the prompts that differ.

    python bench/agreement.py     # ~2.5 min adapt on a first run (then cached), ~1 min decoding
Results: bench/results/agreement.json and agreement.md.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from common import DATA, RESULTS, ROOT, machine, save
from edgelora.bundle import Bundle, home
from edgelora.evaluate import exact_match, normalize
from edgelora.examples import Example, load_examples
from edgelora.io import atomic_write, sha256_file

TASKS = ("date_understanding", "boolean_expressions", "navigate", "object_counting")
PER_TASK = 5
MAX_NEW = 32
EXAMPLES = ROOT / "examples" / "date_understanding.jsonl"
# the code that makes the adapted weights and writes them: a change to any of it makes a new model
CODE = ("search.py", "scorer.py", "lora.py", "examples.py", "outputs.py", "writeback.py", "formats.py")
PAIRS = (("edgelora-int4", "genai-int4", "same int4 folder, two runtimes"),
         ("edgelora-int4", "edgelora-fp32", "quantization: int4 vs fp32 (edgelora)"),
         ("edgelora-fp32", "llamacpp-lora", "same weights: fp32 vs llama.cpp Q4_1 + GGUF LoRA"),
         ("edgelora-int4", "llamacpp-lora", "edgelora int4 vs llama.cpp Q4_1 + GGUF LoRA"),
         ("edgelora-base", "llamacpp-base", "control, no LoRA: fp32 vs llama.cpp Q4_1"),
         ("llamacpp-lora", "llamacpp-base", "LoRA effect in llama.cpp (should differ)"),
         ("edgelora-fp32", "edgelora-base", "LoRA effect in edgelora fp32 (should differ)"))

Runner = Callable[[list[int]], list[int]]


def adapted(bundle: Bundle) -> tuple[Path, Path, Path, list[str]]:
    """The int4 adapt output, its fp32 write-back and its GGUF LoRA, made once per bundle,
    example file and code (~/.cache/edgelora/bench/agreement/KEY/); the commands that made them."""
    from edgelora.formats import export, load_adapted
    from edgelora.writeback import write_model
    code = hashlib.sha256(b"".join((ROOT / "edgelora" / f).read_bytes() for f in CODE)).hexdigest()
    key = f"{sha256_file(bundle.path / 'manifest.json')[:12]}-{sha256_file(EXAMPLES)[:8]}-{code[:8]}"
    root = home() / "bench" / "agreement" / key
    int4, fp32, gguf = root / "date_understanding-adapted", root / "fp32", root / "date_understanding-lora.gguf"
    commands = [f"edgelora adapt {EXAMPLES.relative_to(ROOT)} --out {int4} --json",
                f"write_model(bundle, *load_adapted({int4.name})[1:], {fp32}, 'none', merged=True)",
                f"edgelora export {int4} --format gguf -o {gguf}"]
    if not (int4 / "model.onnx").exists():
        root.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "edgelora.cli", "adapt", str(EXAMPLES), "--out", str(int4), "--json"],
                           check=True, capture_output=True, text=True)
        info = {**json.loads(r.stdout.strip().splitlines()[-1]), "wall_s": round(time.perf_counter() - t, 1)}
        atomic_write(root / "adapt.json", json.dumps(info, indent=2) + "\n")
    if not (fp32 / "edgelora.json").exists():
        b, A, B = load_adapted(int4)
        write_model(b, A, B, fp32, "none", merged=True)
    if not gguf.exists():
        export(int4, "gguf", gguf)
    return int4, fp32, gguf, commands


def prompts(bundle: Bundle) -> tuple[list[Example], list[list[int]]]:
    """The first PER_TASK test questions of each task and their prompt token ids (tokenized once)."""
    examples = [ex for t in TASKS for ex in load_examples(DATA / "bbh" / f"{t}.test.jsonl")[:PER_TASK]]
    tok, fmt = bundle.tokenizer(), bundle.prompt_format
    ids = [tok.encode(fmt.prompt(ex.input), add_special_tokens=False).ids[-bundle.arch["max_len"]:] for ex in examples]
    return examples, ids


def edgelora_runner(folder: Path) -> Runner:
    """edgelora's Decoder on an adapt output or a bundle, a full prefill per prompt (no prefix reuse,
    as one `edgelora generate` call runs it)."""
    from edgelora.generate import Model
    dec = Model.load(folder).decoder

    def run(ids: list[int]) -> list[int]:
        return list(dec.stream(ids, MAX_NEW, prefill=dec.forward(ids, 0)))
    return run


def genai_runner(folder: Path, eos: set[int]) -> Runner:
    import onnxruntime_genai as og
    model = og.Model(str(folder))

    def run(ids: list[int]) -> list[int]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + MAX_NEW, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(np.array(ids, dtype=np.int32))
        out: list[int] = []
        while not gen.is_done() and len(out) < MAX_NEW:
            gen.generate_next_token()
            tok = int(gen.get_next_tokens()[0])
            if tok in eos:
                break
            out.append(tok)
        return out
    return run


def llamacpp_runner(lora: Path | None, eos: set[int]) -> Runner:
    import llama_cpp
    from edgelora_export.base_model import default_gguf
    llm = llama_cpp.Llama(model_path=str(default_gguf()), lora_path=str(lora) if lora else None, n_ctx=1024,
                n_threads=2, n_threads_batch=2, n_batch=512, verbose=False)

    def last_logits() -> np.ndarray:
        # llama-cpp-python 0.3.36 keeps `llm.scores` only with logits_all=True (else zeros):
        # read the last position's logits from the context, as its own sampler does
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))

    def run(ids: list[int]) -> list[int]:
        llm.reset()
        llm.eval(ids)
        out: list[int] = []
        while len(out) < MAX_NEW:
            tok = int(np.argmax(last_logits()))
            if tok in eos:
                break
            out.append(tok)
            llm.eval([tok])
        return out
    return run


def first_diff(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (the shorter length if one is a prefix); None if equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def compare(out: dict[str, list[list[int]]], texts: dict[str, list[str]], x: str, y: str) -> dict:
    diffs = [first_diff(a, b) for a, b in zip(out[x], out[y])]
    differ = [d for d in diffs if d is not None]
    return {"n": len(diffs), "same_tokens": len(diffs) - len(differ),
            "same_first_line": sum(normalize(a) == normalize(b) for a, b in zip(texts[x], texts[y])),
            "mean_first_diff": float(np.mean(differ)) if differ else None, "first_diff": diffs}


def table(pairs: dict, exact: dict[str, int], n: int) -> str:
    lines = ["| pair | what | same tokens | same first line | mean first differing token |", "|---|---|---|---|---|"]
    for (x, y, what), p in zip(PAIRS, pairs.values()):
        d = "-" if p["mean_first_diff"] is None else f"{p['mean_first_diff']:.1f}"
        lines.append(f"| {x} / {y} | {what} | {p['same_tokens']}/{n} | {p['same_first_line']}/{n} | {d} |")
    lines += ["", "| runtime | exact match (gold) |", "|---|---|"]
    lines += [f"| {k} | {v}/{n} |" for k, v in exact.items()]
    return "\n".join(lines)


def decode_all(runners: dict[str, Callable[[], Runner]], ids: list[list[int]]) -> tuple[dict, dict]:
    """Each runtime's greedy tokens for every prompt, one runtime loaded at a time; its seconds."""
    out, seconds = {}, {}
    for name, make in runners.items():
        t = time.perf_counter()
        run = make()
        out[name] = [run(p) for p in ids]
        seconds[name] = round(time.perf_counter() - t, 1)
        print(f"{name:<14} {seconds[name]:>6.1f}s  {sum(map(len, out[name]))} tokens")
        del run
    return out, seconds


def write_md(md: str, adapt_info: dict, n: int, eos: set[int]) -> None:
    m = machine()
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items()
                         if k in ("edgelora", "onnxruntime", "onnxruntime-genai", "llama-cpp-python"))
    head = (f"# Greedy agreement across runtimes (`bench/agreement.py`, {m['date'][:10]})\n\n"
            f"The adapted model of `edgelora adapt examples/date_understanding.jsonl` (defaults: int4, LoRA merged, "
            f"targets 8-bit; loss {adapt_info['start_loss']:.4f} -> {adapt_info['loss']:.4f}), the same weights written "
            f"as fp32, and its `edgelora export --format gguf` LoRA on the base Q4_1 GGUF in llama.cpp. {n} prompts "
            f"(the first {PER_TASK} test questions of {', '.join(TASKS)}), tokenized once and fed as ids to every "
            f"runtime, greedy, up to {MAX_NEW} new tokens, stopping at EOS {sorted(eos)}. First differing token: "
            f"0-based, mean over the prompts that differ. {versions}. Commands and every answer: `agreement.json`.\n\n")
    atomic_write(RESULTS / "agreement.md", head + md + "\n")


def main() -> None:
    from importlib.metadata import version
    bundle = Bundle.open()
    int4, fp32, lora, commands = adapted(bundle)
    examples, ids = prompts(bundle)
    eos = set(bundle.manifest["eos_ids"])
    out, seconds = decode_all({
        "edgelora-int4": lambda: edgelora_runner(int4), "edgelora-fp32": lambda: edgelora_runner(fp32),
        "genai-int4": lambda: genai_runner(int4, eos), "llamacpp-lora": lambda: llamacpp_runner(lora, eos),
        "llamacpp-base": lambda: llamacpp_runner(None, eos), "edgelora-base": lambda: edgelora_runner(bundle.path)}, ids)
    tok = bundle.tokenizer()
    texts = {k: [tok.decode(o) for o in v] for k, v in out.items()}
    n = len(ids)
    pairs = {f"{x}|{y}": compare(out, texts, x, y) for x, y, _ in PAIRS}
    exact = {k: sum(exact_match(t, ex) for t, ex in zip(v, examples)) for k, v in texts.items()}
    md = table(pairs, exact, n)
    print(md)
    adapt_info = json.loads((int4.parent / "adapt.json").read_text())
    save("agreement", {
        "tasks": list(TASKS), "per_task": PER_TASK, "max_new_tokens": MAX_NEW, "eos_ids": sorted(eos),
        "commands": commands, "adapt": adapt_info, "gguf_version": version("gguf"),
        "models": {"int4": str(int4), "fp32": str(fp32), "gguf_lora": str(lora)},
        "pairs": {k: {**v, "what": w} for (_, _, w), (k, v) in zip(PAIRS, pairs.items())},
        "exact_match": exact, "seconds": seconds,
        "prompts": [{"task": TASKS[i // PER_TASK], "input": ex.input, "output": ex.output, "prompt_tokens": len(p),
                     "tokens": {k: out[k][i] for k in out}, "text": {k: texts[k][i] for k in texts}}
                    for i, (ex, p) in enumerate(zip(examples, ids))]})
    write_md(md, adapt_info, n, eos)


if __name__ == "__main__":
    main()
