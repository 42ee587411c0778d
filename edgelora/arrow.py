"""Arrow (seed 001; peft's `tuners/lora/arrow.py`, mttl's `ArrowTransform`): routing a LoRA
library per token, with no examples and no search.

Each LoRA's prototype, per layer and module, is the top right singular vector v of its ΔW = B·A
(`lora.prototypes`, stored beside A and B in every bundle LoRA). A token x scores every LoRA by
|x·v|; the top-k are kept and weighted by softmax(score / T), and each kept LoRA's output (times
its own scale) is added with that weight. GenKnowSub first subtracts the mean A and B of some
"general" LoRAs from the others. Routing is per token, so it cannot be merged into the weights:
`routed_decoder` builds the bundle's decoder with the routing in the graph, once per setting. The
same scores rank a library for LoraHub (`rank_by_arrow`) from one base forward.

onnx is imported where the routed graph is built: the search ranks by Arrow without it.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors import safe_open

from .batch import Batch
from .bundle import Bundle, home, sha256_cached
from .errors import UserError
from .io import atomic_write_json, read_json, replace_dir, sha256_file, user_mode
from .lora import SAFETENSORS_ERRORS, Lora, load_checked, load_lora, pad_rank, prototypes, unreadable
from .outputs import DATA_FILE

if TYPE_CHECKING:
    import onnx

    from .scorer import Scorer


@dataclass(frozen=True)
class ArrowRoute:
    """Arrow routing at inference (seed 001, peft's ArrowConfig): per token, layer and target,
    every library LoRA scored by |x·v|, the top-k kept, softmax(score / temperature) over them.
    `gks`: GenKnowSub's general LoRAs, whose mean A and B is subtracted from every task LoRA
    (and which are not routed themselves). `library`: which of the bundle's libraries is routed
    (per-task, or mbc: seed 001's cluster LoRAs)."""
    top_k: int = 3
    temperature: float = 1.0
    gks: tuple[str, ...] = ()
    library: str = "per-task"
    options: str = "prompt"  # scoring given options: "prompt", routing the prompt only; "routed", their tokens too


@dataclass
class ArrowLibrary:
    """The routed LoRAs stacked so that each token's top-k can be gathered (ranks zero-padded to
    the largest, which adds nothing): a decode step reads k LoRAs' A and B, not the library's."""
    protos: dict[str, np.ndarray]  # module -> [L, in, N]: x·protos is every LoRA's score x·vᵢ
    A: dict[str, np.ndarray]  # module -> [L, N, r, in]
    B: dict[str, np.ndarray]  # module -> [L, N, r, out]: scaleᵢ·Bᵢᵀ


def arrow_weights(scores: np.ndarray, top_k: int, temperature: float = 1.0) -> np.ndarray:
    """peft's Arrow routing from raw scores x·v [..., N]: |score|, keep the top-k per token,
    softmax(|score| / T) over the kept ones, 0 elsewhere."""
    s = np.abs(scores) / temperature
    k = min(top_k, s.shape[-1])  # a library smaller than top-k keeps all of it
    kth = np.partition(s, -k, axis=-1)[..., -k, None]
    keep = s >= kth
    e = np.where(keep, np.exp(s - s.max(-1, keepdims=True)), 0.0)
    return e / e.sum(-1, keepdims=True)


def routing_slots(protos: list[dict[str, np.ndarray]], targets: dict[str, dict], layers: int):
    """A slot whose x·Aᵀ is every LoRA's Arrow score |x·v| (before the abs) and whose B is 0, so
    the forward is the base model's: the library ranked, and w = 0 scored, by one forward."""
    A = {m: np.stack([p[m] if m in p else np.zeros((layers, t["in"]), np.float32) for p in protos], axis=1)
         for m, t in targets.items()}
    B = {m: np.zeros((layers, t["out"], len(protos)), np.float32) for m, t in targets.items()}
    return A, B


def gen_know_sub(tasks: list[Lora], general: list[Lora]) -> list[Lora]:
    """GenKnowSub as peft applies it: the mean of the general LoRAs' A and of their B (raw,
    unscaled) subtracted from each task LoRA's A and B. Element-wise, so every rank must agree."""
    ranks = {l.rank for l in tasks + general}
    if len(ranks) > 1:
        raise UserError(f"--gks: GenKnowSub subtracts A and B element-wise, so every LoRA needs one rank; "
                        f"the library has ranks {', '.join(map(str, sorted(ranks)))}")
    mods = tasks[0].A
    mean_A = {m: np.mean([g.A[m] for g in general], axis=0) for m in mods}
    mean_B = {m: np.mean([g.B[m] for g in general], axis=0) for m in mods}
    return [Lora(t.name, t.rank, t.alpha, {m: t.A[m] - mean_A[m] for m in mods},
                 {m: t.B[m] - mean_B[m] for m in mods}, t.source) for t in tasks]


def arrow_library(tasks: list[Lora], general: list[Lora] = ()) -> ArrowLibrary:
    """GenKnowSub first (where general LoRAs are given), then the prototypes of what is left:
    peft's order, so a prototype is the top singular vector of the LoRA that is routed."""
    if general:
        tasks = gen_know_sub(tasks, list(general))
    rank = max(l.rank for l in tasks)
    protos = [prototypes(l) for l in tasks]
    lib = ArrowLibrary({}, {}, {})
    for m in tasks[0].A:
        lib.protos[m] = np.stack([p[m] for p in protos], axis=-1)
        padded = [pad_rank(l.A[m], l.B[m] * l.scale, rank) for l in tasks]
        lib.A[m] = np.stack([a for a, _ in padded], axis=1, dtype=np.float32)
        lib.B[m] = np.stack([b.transpose(0, 2, 1) for _, b in padded], axis=1, dtype=np.float32)
    return lib


def load_prototypes(path: str | Path) -> dict[str, np.ndarray]:
    """A library LoRA's prototypes, read alone (LoRAs saved before they were stored: computed)."""
    try:
        with safe_open(path, "np") as f:
            keys = [k for k in f.keys() if k.endswith(".proto")]
            if keys:
                return {k.removesuffix(".proto"): f.get_tensor(k) for k in keys}
    except SAFETENSORS_ERRORS as e:
        raise unreadable(path, e) from None
    return prototypes(load_lora(path))


# -- ranking a library for LoraHub from one base forward ----------------------------
def arrow_mass(xa: list[np.ndarray], batch: Batch, top_k: int) -> np.ndarray:
    """Each LoRA's Arrow routing mass on the examples ([N]): per token, layer and module, peft's
    routing weights (top-k of |x·v|, softmax over the kept ones), summed over the positions whose
    next token is an answer token (where the loss is measured)."""
    pos = batch.target_pos[batch.target_mask > 0]
    return sum(arrow_weights(x[:, pos, :], top_k).sum(axis=(0, 1)) for x in xa)


def rank_by_arrow(scorer: Scorer, protos: list[dict], bundle: Bundle, top_k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(each LoRA's Arrow routing mass, the forward's per-example target log-probs, seconds) from
    one forward: the slot's A holds every LoRA's prototypes and its B is 0, so the model is the
    base and the log-probs are the search's point w = 0."""
    t0 = time.perf_counter()
    loss, logprob, *xa = scorer.run(*routing_slots(protos, bundle.targets, bundle.arch["layers"]), xa=True)
    seconds = time.perf_counter() - t0
    return arrow_mass(xa, scorer.batch, top_k), logprob, seconds


# -- the routed decoder graph --------------------------------------------------------
GATE = "arrow_gate"  # the routed graph's input that turns the routing on (1) or off (0) for a forward


def add_arrow_routing(model: onnx.ModelProto, weights: dict, lib: ArrowLibrary, route: ArrowRoute) -> None:
    """Arrow beside each target MatMul, exactly as peft's ArrowLoraLinearLayer: scores |x·V|,
    TopK, softmax(top / T) over the kept (peft's softmax with -inf elsewhere), and each token's
    k LoRAs' A and B gathered: Σ cᵢ·(x·Aᵢᵀ)·(scaleᵢ·Bᵢᵀ), times the graph input `arrow_gate` ([1]:
    1 routes, 0 is the base model exactly; `Decoder` feeds it), added to x·Wᵀ. Gathering reads k LoRAs
    per decode step where a dense sum over the library reads all of them (measured against that
    dense sum on the default bundle, 2026-11-25: decode 1.2× at int4, 1.1× at fp32, prefill 0.94×)."""
    import onnx
    from onnx import helper, numpy_helper

    from .writeback import beside_targets
    added: set[str] = set()

    def init(name: str, arr) -> str:
        if name not in added:
            added.add(name)
            model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    k, rank = route.top_k, next(iter(lib.A.values())).shape[2]
    shape = lambda *dims: init(f"arrow/shape{list(dims)}", np.array(dims, np.int64))  # 0: keep that dim
    last = init("arrow/axis-1", np.array([-1], np.int64))

    def nodes_for(m, i, x, base, out):
        p = f"arrow/{m}/{i}"
        d_in, d_out = lib.A[m].shape[3], lib.B[m].shape[3]
        V, A, B = init(f"{p}/V", lib.protos[m][i]), init(f"{p}/A", lib.A[m][i]), init(f"{p}/B", lib.B[m][i])
        node = lambda op, ins, n, **kw: helper.make_node(op, ins, [f"{p}/{n}"], name=f"{p}/{n}", **kw)
        topk = helper.make_node("TopK", [f"{p}/logit", init("arrow/k", np.array([k], np.int64))],
                                [f"{p}/top", f"{p}/top_idx"], name=f"{p}/TopK", axis=-1)
        return [
            node("MatMul", [x, V], "score"),                                   # [b, s, N]
            node("Abs", [f"{p}/score"], "abs"),
            node("Div", [f"{p}/abs", init("arrow/temperature", np.array(route.temperature, np.float32))], "logit"),
            topk,                                                              # [b, s, k] values and LoRA ids
            node("Softmax", [f"{p}/top"], "top_w", axis=-1),
            node("Gather", [A, f"{p}/top_idx"], "A_k", axis=0),               # [b, s, k, r, in]
            node("Reshape", [f"{p}/A_k", shape(0, 0, -1, d_in)], "A_kr"),     # [b, s, k·r, in]
            node("Unsqueeze", [x, last], "x_col"),                            # [b, s, in, 1]
            node("MatMul", [f"{p}/A_kr", f"{p}/x_col"], "xa"),                # [b, s, k·r, 1]
            node("Reshape", [f"{p}/xa", shape(0, 0, k, rank)], "xa_k"),       # [b, s, k, r]
            node("Unsqueeze", [f"{p}/top_w", last], "w_col"),                 # [b, s, k, 1]
            node("Mul", [f"{p}/xa_k", f"{p}/w_col"], "xa_w"),
            node("Reshape", [f"{p}/xa_w", shape(0, 0, 1, k * rank)], "xa_row"),  # [b, s, 1, k·r]
            node("Gather", [B, f"{p}/top_idx"], "B_k", axis=0),               # [b, s, k, r, out]
            node("Reshape", [f"{p}/B_k", shape(0, 0, -1, d_out)], "B_kr"),    # [b, s, k·r, out]
            node("MatMul", [f"{p}/xa_row", f"{p}/B_kr"], "delta_row"),        # [b, s, 1, out]
            node("Reshape", [f"{p}/delta_row", shape(0, 0, d_out)], "delta"),
            node("Mul", [f"{p}/delta", GATE], "gated"),
            helper.make_node("Add", [base, f"{p}/gated"], [out], name=f"{p}/Add")]

    beside_targets(model, weights, "cannot route the library", nodes_for)
    model.graph.input.append(helper.make_tensor_value_info(GATE, onnx.TensorProto.FLOAT, [1]))


def check_route(route: ArrowRoute, library: list[str], where: Path) -> list[str]:
    """The LoRAs `route` routes (the library less its GenKnowSub LoRAs), once its settings fit."""
    if not library:
        raise UserError(f"--route arrow: {where} has no LoRAs to route; add some with edgelora-export lora")
    unknown = [g for g in route.gks if g not in library]
    if unknown:
        raise UserError(f"--gks {unknown[0]}: no LoRA of that name in {where} (edgelora info lists them)")
    tasks = [n for n in library if n not in route.gks]
    if not tasks:
        raise UserError("--gks names every LoRA of the library: none is left to route")
    if not 1 <= route.top_k <= len(tasks):
        raise UserError(f"--top-k {route.top_k}: must be between 1 and the {len(tasks)} LoRAs routed")
    if not route.temperature > 0:
        raise UserError(f"Arrow temperature {route.temperature}: must be above 0")
    return tasks


ROUTED_FILES = ("model.onnx", DATA_FILE)  # weights apart: onnxruntime then holds ~180 MB less
ROUTED_GRAPH = 4  # add_arrow_routing's layout (2: the top-k gathered; 4: gated by arrow_gate); a cached graph of another is rebuilt


def _routed_cached(folder: Path, key: dict) -> bool:
    """Whether `folder` holds the routed graph built for `key`, intact (sha256, cached by mtime)."""
    try:
        meta = read_json(folder / "route.json")
        sums = meta.get("sha256") if isinstance(meta, dict) and meta.get("key") == key else None
        return (isinstance(sums, dict) and set(sums) == set(ROUTED_FILES)
                and all(sha256_cached(folder / f) == sums[f] for f in ROUTED_FILES))
    except (UserError, OSError):
        return False


def routed_decoder(bundle: Bundle, route: ArrowRoute) -> Path:
    """The bundle's decoder with Arrow routing over its library (fp32, like the decoder), built at
    the first use of a bundle and setting and kept in EDGELORA_HOME/routed/, never in the bundle:
    one graph per bundle, swapped in whole, rebuilt when the setting or the bundle changes."""
    paths = bundle.library(route.library)
    tasks = check_route(route, list(paths), bundle.path)
    key = {"graph": ROUTED_GRAPH, "bundle": str(bundle.path.resolve()), "bundle_manifest_sha256": sha256_file(bundle.path / "manifest.json"),
           "top_k": route.top_k, "temperature": route.temperature, "gks": list(route.gks), "library": route.library,
           "loras": tasks}
    suffix = "" if route.library == "per-task" else f"-{route.library}"  # one graph per bundle and library
    folder = home() / "routed" / f"{bundle.path.name}-{hashlib.sha256(key['bundle'].encode()).hexdigest()[:8]}{suffix}"
    if not _routed_cached(folder, key):
        names = tasks + list(route.gks)
        loras = dict(zip(names, load_checked([paths[n] for n in names], bundle)))
        build_routed(bundle, arrow_library([loras[n] for n in tasks], [loras[n] for n in route.gks]), route,
                     folder, key)
    return folder / "model.onnx"


def build_routed(bundle: Bundle, lib: ArrowLibrary, route: ArrowRoute, folder: Path, key: dict) -> None:
    """The routed graph built aside and swapped in whole for `folder`, then its route.json: `key`
    and the files' sha256, which `_routed_cached` checks at the next use."""
    import onnx

    from .writeback import save_with_data
    model = onnx.load(str(bundle.decoder_dir / bundle.manifest["decoder"]["file"]))
    add_arrow_routing(model, bundle.manifest["decoder"]["weights"], lib, route)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    os.chmod(tmp, user_mode(folder=True))
    try:
        save_with_data(model, tmp / ROUTED_FILES[0])
        del model
        replace_dir(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # hashed where they now lie, so the next use finds them in the sha256 cache; a process killed
    # before this line leaves no route.json, and the next use rebuilds
    atomic_write_json(folder / "route.json", {"key": key, "sha256": {f: sha256_cached(folder / f) for f in ROUTED_FILES}})
