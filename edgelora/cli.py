"""edgelora: the command line. Thin: parse, call the modules, print. User errors exit 2
with one line on stderr; Ctrl-C exits 130."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .bundle import KINDS, LIBRARIES, LORA_LIBRARIES, Bundle, default_bundle_path
from .errors import UserError, interrupted_exit_code, run_command
from .evaluate import MODES
from .formats import FORMATS, export
from .lora import COMPOSITIONS
from .outputs import DEFAULT_QUANT, QUANTS
from .recipe import CHOICES
from .search import FINALISTS, OPTIMIZERS, SELECTS, AdaptConfig


def cmd_info(args) -> None:
    from safetensors import safe_open
    bundle = Bundle.open(args.bundle)
    libraries = {}
    for library in LIBRARIES:
        libraries[library] = []
        for name, path in bundle.lora_paths(library).items():
            with safe_open(path, "np") as f:
                meta = f.metadata() or {}
            shape = ({"layers": int(meta.get("layers", 0)), "length": int(meta.get("length", 0))} if library == "prompts"
                     else {"rank": int(meta.get("rank", 0)), "alpha": float(meta.get("alpha", 0))})
            libraries[library].append({"name": name, **shape, "source": meta.get("source", "")})
    loras = libraries.pop("per-task")
    sizes = {n: i["size"] for n, i in bundle.manifest["files"].items()}
    info = {"bundle": str(bundle.path), "base": bundle.manifest["base"], "arch": bundle.arch,
            "targets": {m: {"in": t["in"], "out": t["out"]} for m, t in bundle.targets.items()},
            "size_mb": round(sum(sizes.values()) / 1e6, 1), "loras": loras,
            "loras_mbc": libraries["mbc"], "adaption_prompts": libraries["prompts"]}
    if args.json:
        print(json.dumps(info))
        return
    a = bundle.arch
    print(f"bundle   {bundle.path}  ({info['size_mb']} MB)")
    print(f"base     {info['base']['name']}  [{info['base']['model_type']}]  from {info['base']['source']}")
    print(f"arch     {a['layers']} layers, hidden {a['hidden']}, vocab {a['vocab']}, max {a['max_len']} tokens")
    print("targets  " + ", ".join(f"{m} ({t['in']}→{t['out']})" for m, t in info["targets"].items()))
    for title, lib in (("loras", loras), ("mbc", libraries["mbc"]), ("prompts", libraries["prompts"])):
        if lib or title == "loras":
            print(f"{title:<8} {len(lib)}")
        for l in lib:
            shape = f"{l['length']} tokens in {l['layers']} layers" if "length" in l else f"rank {l['rank']:<3} alpha {l['alpha']:g}"
            print(f"  {l['name']:<48} {shape}")


def cmd_verify(args) -> None:
    bundle = Bundle.open(args.bundle, hashes=False)
    bad = bundle.verify()
    if bad:
        raise UserError(f"{bundle.path}: sha256 differs from the manifest for {', '.join(bad)}")
    print(f"{bundle.path}: {len(bundle.manifest['files'])} files, all sha256 match")


def adapted_folder(examples: Path) -> Path:
    return Path(f"{examples.name.removesuffix('.jsonl').removesuffix('.adapt')}-adapted")


def cmd_adapt(args) -> int:
    """One examples file, or several, each into its own <examples>-adapted/: one after the other,
    or with --ray as tasks on a Ray cluster. Every file is read and every output folder checked
    before the first search, so a mistake in the last file costs no hours."""
    from .examples import load_examples
    from .outputs import check_out
    files = args.examples
    if args.cpus_per_task < 1:
        raise UserError(f"--cpus-per-task {args.cpus_per_task}: must be at least 1")
    if len(files) > 1 and args.out:
        raise UserError("--out names one folder: with several examples files each goes to <examples>-adapted/")
    outs = [args.out or adapted_folder(f) for f in files]
    if len({o.absolute() for o in outs}) < len(outs):
        raise UserError("two examples files have the same name, so the same output folder: rename one")
    bundle = Bundle.open(args.bundle)
    for f, out in zip(files, outs):
        if len(files) > 1:
            load_examples(f, warn=lambda m: None)  # the search reads it again, warnings and all
        check_out(out)  # before the search, not after it
    if args.ray:
        return adapt_on_ray(args, bundle, files, outs)
    for f, out in zip(files, outs):
        if len(files) > 1 and not args.json:
            print(f"{f}:", file=sys.stderr)
        code = adapt_one(args, bundle, f, out)
        if code:
            return code  # interrupted: the next files are not started
    return 0


def adapt_settings(args) -> tuple:
    """--loras (one folder or file as itself, several as a list) and the AdaptConfig the flags set."""
    loras = args.loras[0] if args.loras and len(args.loras) == 1 else args.loras
    return loras, AdaptConfig(**{k: getattr(args, k) for k in AdaptConfig.__dataclass_fields__}).check()


def _adapt_remote(examples: str, bundle: str, out: str, loras, config: AdaptConfig, quant: str | None, cpus: int) -> dict:
    """adapt and write_outputs in a Ray worker, onnxruntime on its CPUs."""
    import os
    os.environ["EDGELORA_THREADS"] = str(cpus)
    from .outputs import write_outputs
    from .search import adapt
    result = adapt(examples, bundle, loras=loras, config=config, warn=lambda m: None)
    write_outputs(result, Bundle.open(bundle), Path(out), quant)
    return {"examples": examples, "out": out, "loss": result.loss, "start_loss": result.start_loss,
            "forwards": result.settings["forwards"], "seconds": round(result.seconds, 2),
            "recipe": result.recipe and result.recipe["choice"]}


def adapt_on_ray(args, bundle: Bundle, files: list[Path], outs: list[Path]) -> int:
    """Each examples file as a Ray task (edgelora.distributed); one line (or JSON object) as each ends."""
    from .distributed import on_ray
    loras, config = adapt_settings(args)
    jobs = {str(f): (str(f.absolute()), str(bundle.path.absolute()), str(out.absolute()), loras, config, args.quant,
                     args.cpus_per_task) for f, out in zip(files, outs)}
    for _, r in on_ray(args.ray, _adapt_remote, jobs, args.cpus_per_task):
        print(json.dumps(r) if args.json else
              f"{r['examples']}: loss {r['start_loss']:.4f} -> {r['loss']:.4f} ({r['forwards']} forwards, "
              f"{r['seconds']:.0f}s), recipe {r['recipe']}; written to {r['out']}/")
    return 0


def adapt_one(args, bundle: Bundle, examples: Path, out: Path) -> int:
    from tqdm import tqdm
    from .outputs import NO_MODEL, summary_table, write_adapted_model, write_result
    from .recipe import deployed, line as recipe_line
    from .search import adapt
    bars = {}  # opened at the first step, so input errors stay one clean line

    def bar(desc: str, total: int):
        if desc not in bars:
            bars[desc] = tqdm(total=total, desc=desc, unit="eval", disable=args.json, dynamic_ncols=True)
        return bars[desc]

    def on_rank(done, total):
        bar("select", total).update(1)
        if done == total:
            bars["select"].close()

    def on_eval(n, ev, best):
        b = bar("search", args.budget)
        b.update(1)
        b.set_postfix_str(f"loss {ev.loss:.4f}  best {best.loss:.4f}")

    loras, config = adapt_settings(args)
    try:
        result = adapt(examples, bundle, loras=loras, config=config, on_eval=on_eval,
                       on_rank=on_rank, warn=lambda m: print(m, file=sys.stderr))
    finally:
        for b in bars.values():
            b.close()
    quant = None if result.interrupted else args.quant
    composed = write_result(result, bundle, out)  # on disk before the write-back, which cannot lose it
    no_model = f"{out}/: {NO_MODEL}; re-run edgelora adapt to write the model"
    stopped = False
    if quant:
        if not args.json:
            what = "adapted" if deployed(result.recipe)[0] else "base"
            print(f"writing the {what} model ({quant}) ...", file=sys.stderr)
        try:
            write_adapted_model(bundle, composed, out, quant, result.recipe)
        except KeyboardInterrupt:
            stopped = True
        except UserError as e:  # a full disk, no permission: building()'s message says what is left
            raise e if NO_MODEL in str(e) else UserError(f"{e}; {no_model}") from None
        except Exception:
            print(f"edgelora: the adapted model could not be written; {no_model}", file=sys.stderr)
            raise
    if args.json:
        print(json.dumps({"out": str(out), "loss": result.loss, "start_loss": result.start_loss,
                          "objective": result.objective, "evaluations": len(result.history),
                          "forwards": result.settings["forwards"], "stop": result.stop,
                          "interrupted": result.interrupted or stopped, "model": bool(quant) and not stopped,
                          "seconds": round(result.seconds, 2),
                          "recipe": result.recipe and result.recipe["choice"],
                          "weights": dict(zip(result.loras, result.weights.round(6).tolist()))}))
    else:
        print(summary_table(result))
        print(f"\nloss {result.start_loss:.4f} (base) -> {result.loss:.4f} after {len(result.history)} evaluations "
              f"({result.settings['forwards']} forward passes, stopped: {result.stop}) in {result.seconds:.1f}s; "
              f"written to {out}/")
        if result.recipe and result.recipe["table"]:
            print(recipe_line(result.recipe))
        if result.recipe:
            print(f"recipe: {result.recipe['choice']} ({result.recipe['why']}; --recipe to choose another)")
    if stopped:
        print(f"edgelora: interrupted while writing the adapted model; {no_model}", file=sys.stderr)
        return interrupted_exit_code()
    if result.interrupted:
        print(f"edgelora: interrupted; the best weights so far are in {out}/weights.json", file=sys.stderr)
        return interrupted_exit_code()
    return 0


def cmd_export(args) -> None:
    out = export(args.adapted, args.format, args.out, args.bundle, force=args.force)
    print(f"{args.format}: {out}")


def cmd_cluster(args) -> None:
    from .cluster import FORMAT, KEEP, N_INIT, cluster_loras, heatmap_svg, is_own_clusters, is_own_heatmap
    from .io import atomic_write, atomic_write_json, check_file_replaceable, sha256_file
    from .lora import load_checked
    from .outputs import versions
    check_seed(args.seed)
    svg = args.out.with_suffix(".svg")
    if svg == args.out:
        raise UserError(f"-o {args.out}: the clusters are written as JSON beside the heat map {svg}; name a .json file")
    check_file_replaceable(args.out, is_own_clusters, "-o", args.force)
    check_file_replaceable(svg, is_own_heatmap, "-o", args.force)
    bundle = Bundle.open(args.bundle)
    paths = bundle.library("per-task")
    c = cluster_loras(load_checked(list(paths.values()), bundle), args.k, args.seed, where=str(bundle.path))
    atomic_write(svg, heatmap_svg(c, f"MBC: cosine similarity of {len(c.names)} LoRAs' parameters, "
                                     f"{len(c.clusters)} clusters (k = {args.k}, seed {args.seed})"))
    settings = {"k": args.k, "seed": args.seed, "keep": KEEP, "svd_dims": c.dims, "n_init": N_INIT,
                "library": "per-task", "n_loras": len(c.names)}
    atomic_write_json(args.out, {"format": FORMAT, **c.to_json(), "settings": settings, "heatmap": svg.name,
                                 "bundle": {"path": str(bundle.path), "base": bundle.manifest["base"]["name"],
                                            "manifest_sha256": sha256_file(bundle.path / "manifest.json")},
                                 "versions": versions()})
    if args.json:
        print(json.dumps({"out": str(args.out), "svg": str(svg), "clusters": c.clusters}))
        return
    width = max(len(n) for n in c.clusters)
    print(f"{'cluster':<{width}}  {'n':>2}  {'within':>6}  LoRAs (tasks)")
    for name, members in c.clusters.items():
        w = c.within(members)
        print(f"{name:<{width}}  {len(members):>2}  {'-' if w is None else f'{w:.3f}':>6}  {', '.join(members)}")
    print(f"\n{len(c.names)} LoRAs in {len(c.clusters)} clusters (within: mean cosine similarity of a cluster's pairs); "
          f"written to {args.out} and {svg}")


def route_from(args):
    """`--route arrow [--top-k K] [--gks LORA ...] [--library L]` as an ArrowRoute (None without --route)."""
    from .arrow import ArrowRoute
    options = getattr(args, "route_options", None)
    if args.route is None:
        if args.top_k is not None or args.gks or options:
            raise UserError("--top-k, --gks and --route-options set Arrow routing: add --route arrow")
        return None
    return ArrowRoute(top_k=ArrowRoute.top_k if args.top_k is None else args.top_k, gks=tuple(args.gks or ()),
                      library=args.library or ArrowRoute.library, options=options or ArrowRoute.options)


def add_route_flags(p: argparse.ArgumentParser) -> None:
    from .arrow import ArrowRoute
    p.add_argument("--route", choices=["arrow"],
                   help="a bundle's base with Arrow routing over its library, per token and target module (zero-shot: "
                        "no examples, no search; the routed graph is built once into EDGELORA_HOME/routed/)")
    p.add_argument("--top-k", type=int, help="--route arrow: LoRAs kept per token (default 3)")
    p.add_argument("--gks", nargs="+", metavar="LORA",
                   help="--route arrow: GenKnowSub, subtract these general LoRAs' mean A and B from the others (not routed)")
    p.add_argument("--route-options", choices=["prompt", "routed"],
                   help=f"--route arrow, ranking a task's options: route the prompt only (prompt), or the options' "
                        f"own tokens too (routed) (default {ArrowRoute.options})")


def check_seed(seed: int) -> None:
    if seed < 0:
        raise UserError(f"--seed {seed}: must be 0 or more")


def cmd_generate(args) -> None:
    import math
    from .generate import Model
    if args.library and args.route is None:
        raise UserError("--library picks the library that --route arrow routes: add --route arrow")
    check_seed(args.seed)
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UserError(f"--temperature {args.temperature}: must be a finite number, 0 (greedy) or more")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p {args.top_p}: must be more than 0 and at most 1")
    model = Model.load(args.model, route=route_from(args))
    prompt = args.prompt if args.prompt not in (None, "-") else sys.stdin.read().strip()
    if not prompt:
        raise UserError("no prompt: give one as an argument or on standard input")
    for piece in model.stream_text(prompt, raw=args.raw, shots=[] if args.zero_shot else None,
                                   max_new_tokens=args.max_new_tokens,
                                   temperature=args.temperature, top_p=args.top_p, seed=args.seed):
        print(piece, end="", flush=True)
    print()
    if model.decoder.stopped_at_limit:
        given, kept = model.prompt_tokens
        print(f"edgelora: warning: stopped at the model's limit of {model.max_len} positions, before "
              f"--max-new-tokens {args.max_new_tokens}: the prompt took {kept}"
              + (f" (its first {given - kept} tokens were cut)" if given > kept else ""), file=sys.stderr)


def eval_library(model: Path, adapted: bool, library: str | None) -> str | None:
    """The library an adapt output composed (its weights.json says; older outputs: per-task), which
    --library, if given, must name; for a bundle, --library must name one it holds. A model
    written without a weights.json (bench scripts' write_model) says nothing: None."""
    from .outputs import WEIGHTS, read_weights
    if not adapted:
        if library:
            Bundle.open(model).library(library)
        return library
    if not (model / WEIGHTS).is_file():
        if library:
            raise UserError(f"--library {library}: {model} has no {WEIGHTS} to say which library it was made from")
        return None
    settings = read_weights(model)["settings"]
    used = settings.get("library", "per-task") if isinstance(settings, dict) else "per-task"
    if isinstance(settings, dict) and settings.get("kind", "lora") == "adaption-prompt":
        used = "prompts"  # the adaption-prompt library, whatever --library said then
    if library and library != used:
        raise UserError(f"--library {library}: {model} was adapted with the {used} library ({model / WEIGHTS})")
    return used


def cmd_eval(args) -> None:
    from .evaluate import evaluate, is_eval_results
    from .examples import load_examples
    from .generate import Model
    from .io import atomic_write_json, check_file_replaceable
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit {args.limit}: must be at least 1")
    if args.k < 0:
        raise UserError(f"-k {args.k}: must be 0 or more")
    route = route_from(args)
    if args.out:  # the default name is checked once the mode is known, before any example runs
        check_file_replaceable(args.out, is_eval_results, "--out", args.force)
    model = Model.load(args.model, route=route)
    adapted = (Path(args.model) / "edgelora.json").is_file()
    library = eval_library(args.model, adapted, args.library)
    mode = args.mode or ("adapted" if adapted else "icl" if args.shots else "zero-shot")
    if mode == "adapted" and not adapted:
        raise UserError(f"--mode adapted: {args.model} is a bundle, not an `edgelora adapt` output")
    if mode == "icl" and not args.shots:
        raise UserError("--mode icl needs --shots FILE (e.g. the task's adapt examples)")
    shots = load_examples(args.shots)[: args.k] if mode == "icl" else [] if args.zero_shot else model.shots
    examples = load_examples(args.task)[: args.limit]
    out = args.out or Path(f"{args.task.name.removesuffix('.jsonl')}.eval-{mode}{'-arrow' if route else ''}.json")
    check_file_replaceable(out, is_eval_results, "--out", args.force)
    from tqdm import tqdm
    bar = tqdm(total=len(examples), desc=f"eval {mode}", unit="ex", disable=args.json)
    res = evaluate(model, examples, shots, args.max_new_tokens, on_example=lambda i, r: bar.update(1))
    bar.close()
    if res["stopped_at_limit"]:
        print(f"note: {res['stopped_at_limit']} answers stopped at the model's limit of {model.max_len} positions, "
              f"before --max-new-tokens {args.max_new_tokens}", file=sys.stderr)
    if res["shots_mean"] < len(shots):
        print(f"note: some prompts were longer than the model's {model.max_len} tokens with all {len(shots)} shots; "
              f"their oldest shots were dropped (mean {res['shots_mean']:.1f} shots)", file=sys.stderr)
    res = {"task": str(args.task), "model": str(args.model), "mode": mode, "shots": len(shots),
           "recipe": model.meta.get("recipe"),
           "quant": model.meta.get("quant"), "library": library, "route": route and vars(route), **res}
    atomic_write_json(out, res)
    if args.json:
        print(json.dumps({k: v for k, v in res.items() if k != "examples"}))
        return
    opt = "-" if res["option_accuracy"] is None else f"{100 * res['option_accuracy']:.1f}%"
    print(f"{'task':<40} {'mode':<10} {'n':>4} {'exact':>7} {'options':>8} {'prompt tok':>10}")
    print(f"{args.task.name:<40} {mode:<10} {res['n']:>4} {100 * res['exact_match']:>6.1f}% {opt:>8} "
          f"{res['prompt_tokens_mean']:>10.0f}")
    print(f"per-example results: {out}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgelora", description="Adapt a small language model from a few examples, on the CPU.")
    sub = p.add_subparsers(dest="cmd", required=True)
    bundle_help = f"bundle folder (default: {default_bundle_path()}; EDGELORA_HOME moves it)"
    i = sub.add_parser("info", help="what a bundle holds")
    i.add_argument("--bundle", type=Path, help=bundle_help)
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_info)
    v = sub.add_parser("verify", help="check every file's sha256 against the manifest")
    v.add_argument("--bundle", type=Path, help=bundle_help)
    v.set_defaults(fn=cmd_verify)
    a = sub.add_parser("adapt", help="find LoRA weights for a task from a few examples (LoraHub)")
    a.add_argument("examples", type=Path, nargs="+",
                   help='JSONL file: {"input": ..., "output": ...} per line; several files are adapted each into its '
                        'own <examples>-adapted/')
    a.add_argument("--bundle", type=Path, help=bundle_help)
    a.add_argument("--out", type=Path, help="output folder (default: <examples>-adapted)")
    a.add_argument("--loras", nargs="+", help="LoRA names in the bundle, .safetensors files, or one folder "
                   "(default: 20 of the bundle's library, chosen by --select)")
    d = AdaptConfig()
    a.add_argument("--select", choices=SELECTS, default=d.select,
                   help=f"which {d.n_loras} library LoRAs to compose (default {d.select}): loss, the lowest loss alone on "
                        "the examples (one forward per library LoRA), the search starting at the best; arrow, the most "
                        "Arrow routing mass on the examples, from one forward that is also the search's first point "
                        "(faster, less accurate: bench/results/bbh.md); random, LoraHub's sample with --seed")
    a.add_argument("--select-len", type=int, default=d.select_len,
                   help=f"--select loss: rank the library on each example's last N tokens after the shared chat header "
                        f"(cheaper forwards), then score the best {FINALISTS} on the whole examples; only where that "
                        f"saves forward work (default {d.select_len}, bench/results/select_len_64.json; 0: whole examples)")
    a.add_argument("--n-loras", type=int, default=d.n_loras, help=f"LoRAs to compose (default {d.n_loras})")
    a.add_argument("--budget", type=int, default=d.budget,
                   help=f"points scored, one forward pass each, the start included (default {d.budget})")
    a.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer,
                   help=f"gradient-free optimizer (default {d.optimizer}: what the reference's NGOpt picks here); "
                        "surrogate models the hidden states of every forward, picks its span and radius by "
                        "leave-one-out, and spends forwards only to correct the model")
    a.add_argument("--compose", choices=COMPOSITIONS, default=d.compose,
                   help=f"how LoRAs combine (default {d.compose}): lorahub, A = Σ w·A and B = Σ w·B as the paper; cat, "
                        "the exact Σ w·scale·B·A (peft's cat; rank r per LoRA used; --optimizer surrogate needs it)")
    a.add_argument("--no-loo", dest="loo", action="store_false",
                   help="--optimizer surrogate: skip the leave-one-out choice; span --n-loras LoRAs, radius 0.5")
    a.add_argument("--recipe", choices=CHOICES, default=d.recipe,
                   help=f"what to deploy (default {d.recipe}): auto picks by leave-one-out on the examples (with "
                        "--optimizer surrogate) among adapted (the adapted model), adapted+icl (it, with the examples "
                        "in every prompt), icl (the base model with them) and zero-shot (the base alone)")
    a.add_argument("--l1", type=float, default=d.l1, help=f"weight of the mean |w| penalty (default {d.l1})")
    a.add_argument("--bounds", type=float, default=d.bounds, help=f"search box [-b, b] (default {d.bounds})")
    a.add_argument("--seed", type=int, default=d.seed, help=f"for --select random and --optimizer cma (default {d.seed})")
    a.add_argument("--top-k", type=int, default=d.top_k, help=f"Arrow routing: LoRAs kept per token (default {d.top_k})")
    a.add_argument("--patience", type=int, default=d.patience,
                   help=f"after the optimizer's first n+1 points, stop when the best objective gained < 1e-4 over this "
                        f"many points (default {d.patience}; 0: never)")
    a.add_argument("--kind", choices=KINDS, default=d.kind,
                   help=f"what to compose (default {d.kind}): lora, --library's LoRAs; adaption-prompt, the bundle's "
                        "library of LLaMA-Adapter adaption prompts (prompts and gates summed with the weights; "
                        "edgelora-export library --kind adaption-prompt --bundle installs one)")
    a.add_argument("--library", choices=LORA_LIBRARIES, default=d.library,
                   help=f"the bundle's library to compose (default {d.library}): per-task, a LoRA per upstream task; "
                        "mbc, a LoRA per cluster of them (edgelora cluster, then edgelora-export library --clusters)")
    a.add_argument("--quant", choices=QUANTS, default=DEFAULT_QUANT,
                   help=f"the adapted model's weights, LoRA merged: int4 (the LoRA's targets at 8 bits), int8, or fp32 "
                        f"(default {DEFAULT_QUANT}, chosen in bench/quant_accuracy.py)")
    a.add_argument("--no-model", dest="quant", action="store_const", const=None,
                   help="write only the weights and the adapter, not the ONNX model")
    a.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    a.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS",
                   help="several examples files as tasks on a Ray cluster (default: the running one, 'auto'; 'local' "
                        "starts one here); the files, the bundle and the outputs on paths every node shares "
                        "(pip install 'edgelora[ray]')")
    a.add_argument("--cpus-per-task", type=int, default=1, help="--ray: CPUs (onnxruntime threads) per task (default 1)")
    a.set_defaults(fn=cmd_adapt)
    x = sub.add_parser("export", help="an adapt output's LoRA for other runtimes: PEFT, llama.cpp, onnxruntime")
    x.add_argument("adapted", type=Path, help="an `edgelora adapt` output folder")
    x.add_argument("--format", required=True, metavar="|".join(FORMATS),
                   help="peft: a PEFT LoRA folder; gguf: a llama.cpp LoRA adapter; onnx-adapter: an onnxruntime "
                        ".onnx_adapter file, named for onnxruntime-genai's builder")
    x.add_argument("-o", "--out", type=Path,
                   help="where to write (default: beside ADAPTED, <adapted>-peft/, <adapted>-lora.gguf or "
                        "<adapted>.onnx_adapter)")
    x.add_argument("--bundle", type=Path, help="the bundle it was adapted on (default: the one its weights.json names)")
    x.add_argument("--force", action="store_true",
                   help="replace whatever is at -o (without it, only an earlier export is replaced)")
    x.set_defaults(fn=cmd_export)
    c = sub.add_parser("cluster", help="group the bundle's LoRAs by parameter similarity (MBC, for a per-cluster library)")
    c.add_argument("--bundle", type=Path, help=bundle_help)
    c.add_argument("--k", type=int, default=10, help="clusters (default 10, the paper's)")
    c.add_argument("--seed", type=int, default=0, help="k-means++ starts (default 0)")
    c.add_argument("-o", "--out", type=Path, default=Path("clusters.json"),
                   help="clusters JSON (default clusters.json); the heat map is written beside it as .svg")
    c.add_argument("--force", action="store_true",
                   help="replace whatever is at -o and beside it (without it, only an earlier run's files are replaced)")
    c.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    c.set_defaults(fn=cmd_cluster)
    g = sub.add_parser("generate", help="generate text with an adapt output or a bundle's base")
    g.add_argument("model", type=Path, help="an `edgelora adapt` output folder or a bundle")
    g.add_argument("prompt", nargs="?", help="the prompt (default: all of standard input)")
    g.add_argument("--raw", action="store_true", help="no chat template: the prompt as it is")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--zero-shot", action="store_true", help="leave out the examples an adapt output's recipe "
                   "(adapted+icl, icl) puts before every prompt")
    g.add_argument("--library", choices=LORA_LIBRARIES, help="--route arrow: the bundle's library to route (default per-task)")
    add_route_flags(g)
    g.set_defaults(fn=cmd_generate)
    e = sub.add_parser("eval", help="score a model on a task file: exact match and option ranking")
    e.add_argument("task", type=Path)
    e.add_argument("--model", type=Path, required=True, help="an `edgelora adapt` output folder or a bundle")
    e.add_argument("--mode", choices=MODES)
    e.add_argument("--shots", type=Path, help="examples to put in the prompt (icl)")
    e.add_argument("-k", type=int, default=5, help="how many shots (default 5)")
    e.add_argument("--zero-shot", action="store_true", help="leave out the examples an adapt output's recipe "
                   "(adapted+icl, icl) puts before every prompt")
    e.add_argument("--limit", type=int, help="score only the first N examples")
    e.add_argument("--max-new-tokens", type=int, default=32)
    e.add_argument("--out", type=Path, help="JSON with per-example results (default: <task>.eval-<mode>.json)")
    e.add_argument("--force", action="store_true",
                   help="replace whatever is at --out (without it, only an earlier eval's results are replaced)")
    e.add_argument("--json", action="store_true")
    e.add_argument("--library", choices=LORA_LIBRARIES,
                   help="the LoRA library the model must come from: an adapt output's (its weights.json), or one the "
                        "bundle holds (with --route arrow: the library routed); recorded in the results")
    add_route_flags(e)
    e.set_defaults(fn=cmd_eval)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    return run_command("edgelora", lambda: args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
