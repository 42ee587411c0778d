"""`edgelora-export train` and `library`: an adapter on the CPU, resumable, deterministic.

Two kinds, both peft's: a LoRA trained with LoRA+ (arXiv 2402.12354: B learns λ times faster than
A, peft's create_loraplus_optimizer), or LLaMA-Adapter's adaption prompts (seed 003,
`edgelora.adaption_prompt`) with AdamW. The loss covers the answer tokens only, and the LM head runs
only where they are: on a 135M model with a 49k vocabulary the head is a fifth of the forward cost.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from edgelora.batch import tokenize_pairs
from edgelora.bundle import KINDS
from edgelora.errors import UserError
from edgelora.examples import PromptFormat, load_examples
from edgelora.io import atomic_write_json, peak_rss_mb, read_json, writing
from .base_model import DEFAULT_TARGETS
from .console import say, stderr


# The kinds' learning rates: LoRA+'s A (B's is lr * loraplus_ratio); LLaMA-Adapter's paper's 9e-3.
DEFAULT_LR = {"lora": 3e-4, "adaption-prompt": 9e-3}


@dataclass
class TrainConfig:
    kind: str = "lora"
    rank: int = 8                 # lora: rank, alpha, targets, loraplus_ratio
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    lr: float | None = None       # None: the kind's (DEFAULT_LR)
    loraplus_ratio: float = 16.0
    adapter_len: int = 10         # adaption-prompt: prompt tokens in each adapted layer
    adapter_layers: int = 8       # adaption-prompt: the top layers adapted
    batch: int = 8
    steps: int = 30               # ~4 s a step on 2 cores: 39 LoRAs in ~1.5 h
    max_len: int = 192            # tokens per example: beyond it the prompt loses its start (batch.tokenize_pairs)
    heldout: int = 32             # examples kept apart for early stopping
    eval_every: int = 5           # held-out loss every 5 steps; stop after `patience` evaluations
    patience: int = 2             # without a new best (10 steps: it can fire within the 30)
    min_delta: float = 0.0        # a new best beats the last by more than this (held-out nats a token)
    seed: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UserError(f"--kind {self.kind}: choose one of {', '.join(KINDS)}")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.kind]
        if self.min_delta < 0:
            raise UserError(f"--min-delta {self.min_delta}: must be at least 0")
        if self.kind == "adaption-prompt" and min(self.adapter_len, self.adapter_layers) < 1:
            raise UserError(f"--adapter-len {self.adapter_len} and --adapter-layers {self.adapter_layers}: "
                            "each must be at least 1")

    def peft_config(self):
        from peft import AdaptionPromptConfig, LoraConfig
        if self.kind == "lora":
            return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=list(self.targets), lora_dropout=0.0,
                              task_type="CAUSAL_LM")
        return AdaptionPromptConfig(adapter_len=self.adapter_len, adapter_layers=self.adapter_layers,
                                    task_type="CAUSAL_LM")

    def optimizer(self, model):
        if self.kind == "lora":
            from peft.optimizers import create_loraplus_optimizer
            return create_loraplus_optimizer(model, optimizer_cls=torch.optim.AdamW, lr=self.lr,
                                             loraplus_lr_ratio=self.loraplus_ratio, weight_decay=0.0)
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=self.lr, weight_decay=0.0)


def tokenize(examples, tok, fmt: PromptFormat, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(prompt, answer) token rows, tokenised and cut as the runtime scores them
    (`edgelora.batch.tokenize_pairs`, on the `tokenizers` tokenizer behind the HF one), so a LoRA
    learns on the tokens that will score it."""
    return tokenize_pairs(tok.backend_tokenizer, fmt.pairs(examples), max_len)[0]


def collate(rows, pad_id: int):
    T = max(len(p) + len(t) for p, t in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    pos, tgt = [], []
    for i, (p, t) in enumerate(rows):
        ids[i, : len(p) + len(t)] = torch.tensor(p + t)
        mask[i, : len(p) + len(t)] = 1
        pos += [(i, j) for j in range(len(p) - 1, len(p) + len(t) - 1)]
        tgt += t
    return ids, mask, torch.tensor(pos), torch.tensor(tgt)


def target_loss(model, ids, mask, pos, tgt) -> torch.Tensor:
    """Mean cross-entropy over answer tokens, LM head at those positions only."""
    h = model.get_base_model().model(input_ids=ids, attention_mask=mask).last_hidden_state
    logits = model.get_base_model().lm_head(h[pos[:, 0], pos[:, 1]])
    return torch.nn.functional.cross_entropy(logits.float(), tgt)


def evaluate(model, rows, pad_id: int, batch: int) -> float:
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            ids, mask, pos, tgt = collate(rows[i: i + batch], pad_id)
            total += target_loss(model, ids, mask, pos, tgt).item() * len(tgt)
            n += len(tgt)
    return total / max(n, 1)


def stopping(held: list[list[float]], cfg: TrainConfig) -> tuple[int, int | None]:
    """(best step, the step training stops at or None) of a held-out curve [[step, loss], ...]:
    a new best beats the last by more than `min_delta`, and training stops `patience` evaluations
    after the last one. Without a margin a task learnt to a loss near 0 gains 1e-5 an evaluation
    and runs to --steps. One rule for training and for a library resumed under another rule."""
    best_step, best = held[0]
    for step, loss in held[1:]:
        if loss < best - cfg.min_delta:
            best_step, best = step, loss
        if (step - best_step) // cfg.eval_every >= cfg.patience:
            return best_step, step
    return best_step, None


def lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(path: Path, model, opt, meta: dict, best_state: dict[str, torch.Tensor]) -> None:
    """LoRA weights, the best held-out step's weights and AdamW moments as safetensors, progress
    as JSON: resumable without pickle, and a resumed run saves the same best weights."""
    from safetensors.torch import save_file
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    tensors = {f"w/{n}": p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    tensors.update({f"best/{n}": t.contiguous() for n, t in best_state.items()})
    for p, st in opt.state.items():
        for k in ("exp_avg", "exp_avg_sq"):
            tensors[f"{k}/{names[id(p)]}"] = st[k].contiguous()
        meta.setdefault("opt_step", {})[names[id(p)]] = float(st["step"])
    with writing(path) as tmp:
        save_file(tensors, str(tmp))
    atomic_write_json(path.with_suffix(".json"), meta)


# The settings that only decide when training stops: a library resumed with others keeps each
# adapter whose curve stops alike under them (library.check_resumable).
STOPPING = ("patience", "min_delta")


def as_saved(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg)))  # tuples as JSON lists, as saved


def saved_settings(saved: dict) -> dict:
    """The settings of saved work, a setting added since taken at its default (a LoRA library
    from before `kind` resumes)."""
    return {**as_saved(TrainConfig()), **saved}


def rule_changed(saved: dict, cfg: TrainConfig) -> bool:
    old, now = saved_settings(saved), as_saved(cfg)
    return any(old[k] != now[k] for k in STOPPING)


def check_same_config(saved: dict, cfg: TrainConfig, where: Path, hint: str, ignore: tuple[str, ...] = ()) -> None:
    """Refuse to continue work made with other settings: its weights would not be this run's."""
    old, now = saved_settings(saved), as_saved(cfg)
    changed = [f"{k} {old.get(k)!r} → {now[k]!r}" for k in now if old.get(k) != now[k] and k not in ignore]
    if changed:
        raise UserError(f"{where}: made with other settings ({', '.join(changed)}); {hint}")


def load_checkpoint(path: Path, model, opt, cfg: TrainConfig) -> tuple[dict, dict[str, torch.Tensor]]:
    """(progress, best weights) of an interrupted run with the same configuration, or another
    stopping rule under which its best step is the same (it holds only that step's best weights)."""
    from safetensors.torch import load_file
    meta = read_json(path.with_suffix(".json"))
    hint = "delete it to start over, or pass the same settings to resume"
    check_same_config(meta.get("config", {}), cfg, path.with_suffix(".json"), hint, ignore=STOPPING)
    if rule_changed(meta.get("config", {}), cfg) and (best := stopping(meta["held"], cfg)[0]) != meta["best"]["step"]:
        raise UserError(f"{path.with_suffix('.json')}: under this stopping rule its best held-out step is {best}, "
                        f"whose weights it does not hold (it holds step {meta['best']['step']}'s); {hint}")
    tensors = load_file(str(path))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, p in params.items():
            if p.requires_grad:
                p.copy_(tensors[f"w/{n}"])
                if n in meta.get("opt_step", {}):
                    opt.state[p] = {"step": torch.tensor(meta["opt_step"][n]), "exp_avg": tensors[f"exp_avg/{n}"].clone(),
                                    "exp_avg_sq": tensors[f"exp_avg_sq/{n}"].clone()}
    return meta, {n[len("best/"):]: t for n, t in tensors.items() if n.startswith("best/")}


def train_adapter(base, tok, fmt: PromptFormat, task: Path, out: Path, cfg: TrainConfig, log=say) -> dict:
    """Train one adapter of `cfg.kind` on `task`; write a PEFT folder to `out`. Returns the report row."""
    from peft import get_peft_model
    t0 = time.time()
    peak_rss_mb(reset=True)
    examples = load_examples(task)
    if len(examples) < 8:
        raise UserError(f"{task}: {len(examples)} examples are too few to train a LoRA (need at least 8)")
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(examples))
    n_held = min(cfg.heldout, len(examples) // 5)
    rows = tokenize([examples[i] for i in order], tok, fmt, cfg.max_len)
    held, train = rows[:n_held], rows[n_held:]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if cfg.kind == "adaption-prompt" and cfg.adapter_layers > len(base.model.layers):
        raise UserError(f"--adapter-layers {cfg.adapter_layers}: the base has {len(base.model.layers)} layers")
    torch.manual_seed(cfg.seed)
    model = get_peft_model(base, cfg.peft_config())
    try:
        opt = cfg.optimizer(model)
        ckpt = out.with_name(out.name + ".ckpt.safetensors")
        meta = {"step": 0, "curve": [], "held": [], "best": None, "config": asdict(cfg)}
        best_state = lora_state(model)
        if ckpt.exists():
            meta, best_state = load_checkpoint(ckpt, model, opt, cfg)
            log(f"resuming {task.stem} at step {meta['step']}")
        earlier = meta.get("seconds", 0.0)  # the training seconds of the runs this one resumes
        if meta["best"] is None:
            meta["best"] = {"step": 0, "loss": evaluate(model, held, pad_id, cfg.batch)}
            meta["held"].append([0, meta["best"]["loss"]])
        per_epoch = max(1, len(train) // cfg.batch)
        bar = tqdm(total=cfg.steps, initial=meta["step"], desc=task.stem[:32], unit="step", leave=False,
                   file=stderr())  # the terminal, also while the libraries' output goes to the log
        while meta["step"] < cfg.steps and stopping(meta["held"], cfg)[1] is None:
            step = meta["step"]
            epoch, k = divmod(step, per_epoch)
            perm = np.random.default_rng([cfg.seed, epoch]).permutation(len(train))
            batch = [train[i] for i in perm[k * cfg.batch:(k + 1) * cfg.batch]]
            model.train()
            loss = target_loss(model, *collate(batch, pad_id))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            meta["step"] = step + 1
            meta["curve"].append([meta["step"], round(loss.item(), 5)])
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", held=f"{meta['best']['loss']:.3f}")
            if meta["step"] % cfg.eval_every == 0 or meta["step"] == cfg.steps:
                model.eval()
                meta["held"].append([meta["step"], round(evaluate(model, held, pad_id, cfg.batch), 5)])
                best_step, _ = stopping(meta["held"], cfg)
                if best_step == meta["step"]:
                    meta["best"] = {"step": best_step, "loss": meta["held"][-1][1]}
                    best_state = lora_state(model)
                meta["seconds"] = earlier + time.time() - t0
                save_checkpoint(ckpt, model, opt, meta, best_state)
        bar.close()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in best_state:
                    p.copy_(best_state[n])
        model.save_pretrained(out)
        row = {"task": task.stem, "examples": len(examples), "steps": meta["step"], "best_step": meta["best"]["step"],
               "train_loss": meta["curve"][-1][1] if meta["curve"] else None,
               "heldout_loss_start": meta["held"][0][1], "heldout_loss": round(meta["best"]["loss"], 5),
               "minutes": round((earlier + time.time() - t0) / 60, 2),
               "peak_rss_mb": round(peak_rss_mb()),
               "curve": meta["curve"], "heldout_curve": meta["held"]}
        atomic_write_json(out / "train_report.json", {**row, "config": asdict(cfg)})
        ckpt.unlink(missing_ok=True)
        ckpt.with_suffix(".json").unlink(missing_ok=True)
        return row
    finally:  # the base model again, without adapter layers, for the next task
        model.unload() if cfg.kind == "lora" else model.base_model.disable_adapter_layers()


def load_for_training(source, threads: int | None = None):
    """(model, tokenizer, prompt format, name), on `threads` torch threads (default: every core)."""
    from .base import prompt_format
    from .base_model import load_base
    torch.set_num_threads(threads or os.cpu_count() or 1)
    base, tok, name = load_base(source)
    for p in base.parameters():
        p.requires_grad_(False)
    return base, tok, PromptFormat.from_dict(prompt_format(tok)), name
