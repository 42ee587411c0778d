"""KV-cache decoding on an ONNX causal-LM graph (the input_ids / attention_mask /
past_key_values.N → logits / present.N layout that onnxruntime-genai's builder and optimum
share): greedy or top-p sampling, streamed token by token."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import onnxruntime as ort

from .arrow import GATE, ArrowRoute, routed_decoder
from .batch import common_prefix
from .errors import UserError
from .examples import Example, PromptFormat
from .scorer import session_options
from .outputs import MODEL_META, WEIGHTS, check_model, recipe_shots


class Decoder:
    """One sequence's decoding with its KV cache in one preallocated buffer per layer, bound as
    both GroupQueryAttention's past and present (the share-buffer layout onnxruntime-genai runs
    the same graph with): a step writes its own keys and values in place, where a cache fed
    and returned through numpy is copied whole at every token. `cache_ids` are the tokens the
    buffer holds; a call may restart at any earlier position, which is how options branch
    from one prompt and a new prompt reuses the prefix it shares with the last."""

    FIRST_ROOM = 256  # positions reserved at the first call; the buffer doubles when full

    def __init__(self, model_path: str | Path, eos_ids: list[int], threads: int | None = None):
        self.session = ort.InferenceSession(str(model_path), session_options(threads),
                                            providers=["CPUExecutionProvider"])
        self.eos = set(eos_ids)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        shape = inputs[self.past_names[0]].shape  # [batch, kv_heads, past, head_dim]
        self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])
        self.use_positions = "position_ids" in inputs
        self.gated = GATE in inputs  # a routed graph: its routing turned on or off per forward
        vocab = next(o for o in self.session.get_outputs() if o.name == "logits").shape[-1]
        if not isinstance(vocab, int):
            raise UserError(f"{model_path}: the logits output has no fixed vocabulary size ({vocab!r})")
        self.vocab = vocab
        self.cache_ids: list[int] = []
        self.stopped_at_limit = False  # whether the last stream ended at the model's last position
        self._buffers: dict[str, np.ndarray] = {}  # the numpy arrays own the memory the OrtValues wrap
        self._values: dict[str, ort.OrtValue] = {}
        self._io = self.session.io_binding()
        self.first_room = self.FIRST_ROOM

    def _reserve(self, n: int) -> None:
        """Room for `n` positions, kept from call to call; grown by doubling, the cached part copied.
        np.zeros pages are only resident once written, so the room costs nothing until used."""
        have = next(iter(self._buffers.values())).shape[2] if self._buffers else 0
        if n <= have:
            return
        size = max(self.first_room, 2 * have, n)
        keep = len(self.cache_ids)
        for name in self.past_names:
            buf = np.zeros((1, self.kv_heads, size, self.head_dim), np.float32)
            if keep:
                buf[:, :, :keep] = self._buffers[name][:, :, :keep]
            self._buffers[name] = buf
            self._values[name] = ort.OrtValue.ortvalue_from_numpy(buf)
        self._io.clear_binding_inputs()
        for past, present in zip(self.past_names, self.present_names):
            self._io.bind_ortvalue_input(past, self._values[past])
            self._io.bind_ortvalue_output(present, self._values[past])  # bound once, not per step

    def forward(self, ids: list[int], start: int, gate: float = 1.0) -> np.ndarray:
        """Logits of every position of `ids`, placed after the first `start` cached tokens
        (whatever the cache held from `start` on is overwritten); `gate` 0 runs a routed graph's
        tokens without the routing."""
        if start > len(self.cache_ids):
            raise ValueError(f"start {start} is past the {len(self.cache_ids)} cached tokens")
        self.cache_ids = self.cache_ids[:start]
        end = start + len(ids)
        self._reserve(end)
        io = self._io
        io.bind_cpu_input("input_ids", np.array([ids], np.int64))
        io.bind_cpu_input("attention_mask", np.ones((1, end), np.int64))
        if self.use_positions:
            io.bind_cpu_input("position_ids", np.arange(start, end, dtype=np.int64)[None])
        if self.gated:
            io.bind_cpu_input(GATE, np.array([gate], np.float32))
        logits = np.empty((1, len(ids), self.vocab), np.float32)  # written in place: no copy out
        io.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))  # the presents stay bound
        self.session.run_with_iobinding(io)
        self.cache_ids += list(ids)
        return logits[0]

    def prefill(self, ids: list[int]) -> np.ndarray:
        """`forward` of a prompt, except the longest prefix it shares with what the cache holds,
        which is kept: eval's prompts share the system turn, and ICL prompts share every shot,
        so only the new tail is computed. The logits cover that tail."""
        n = min(common_prefix(self.cache_ids, ids), len(ids) - 1)
        return self.forward(ids[n:], n)

    def _last_logits(self, prompt_ids: list[int], prefill: np.ndarray | None) -> np.ndarray:
        """The prompt's next-token logits: `prefill`'s, while the cache still holds the prompt."""
        if prefill is not None and self.cache_ids[: len(prompt_ids)] == list(prompt_ids):
            return prefill[-1]
        return self.prefill(prompt_ids)[-1]

    def stream(self, prompt_ids: list[int], max_new_tokens: int = 128, temperature: float = 0.0,
               top_p: float = 1.0, seed: int = 0, prefill: np.ndarray | None = None,
               max_len: int | None = None) -> Iterator[int]:
        """`prefill`: this prompt's `prefill` output, when the caller already has it. `max_len`: the
        model's positions; the sequence (prompt and new tokens) never goes past them, and where
        that ends the stream before `max_new_tokens`, `stopped_at_limit` is set."""
        self.stopped_at_limit = False
        rng = np.random.default_rng(seed)
        logits = self._last_logits(prompt_ids, prefill)
        n = len(prompt_ids)
        for _ in range(max_new_tokens):
            if max_len is not None and n >= max_len:  # the next token would sit past the last position
                self.stopped_at_limit = True
                return
            tok = pick(logits, temperature, top_p, rng)
            if tok in self.eos:
                return
            yield tok
            logits = self.forward([tok], n)[-1]
            n += 1

    def option_logprobs(self, prompt_ids: list[int], options: list[list[int]],
                        prefill: np.ndarray | None = None, gate: float = 1.0) -> list[float]:
        """Summed log-prob of each option's tokens after the prompt; the prompt is run once, the
        options' own tokens with `gate` (0: a routed graph routes the prompt only)."""
        first = log_softmax(self._last_logits(prompt_ids, prefill))
        n = len(prompt_ids)
        out = []
        for opt in options:
            lp = float(first[opt[0]])
            if len(opt) > 1:
                lps = log_softmax(self.forward(opt[:-1], n, gate))
                lp += float(sum(lps[j, t] for j, t in enumerate(opt[1:])))
            out.append(lp)
        return out


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


@dataclass
class Model:
    """A decoder graph with what is needed to prompt it: a bundle's base or an adapt output."""

    path: Path
    decoder: Decoder
    tokenizer: object
    fmt: PromptFormat
    max_len: int
    meta: dict
    option_gate: float = 1.0  # a routed model's routing on the options' own tokens (ArrowRoute.options)
    shots: list[Example] = field(default_factory=list)  # an adapt output's recipe puts them in every prompt

    @classmethod
    def load(cls, path: str | Path, threads: int | None = None, route: ArrowRoute | None = None) -> "Model":
        """`route`: a bundle's base with Arrow routing over its library at every target
        (`routed_decoder`), zero-shot: no examples, no search."""
        from tokenizers import Tokenizer
        from .bundle import Bundle
        path = Path(path)
        if route is not None and not (path / "manifest.json").is_file():
            raise UserError(f"--route arrow: {path} is not a bundle; routing needs a bundle's decoder and library")
        if (path / MODEL_META).is_file():
            meta = check_model(path)
            onnx_path, tok_path = path / "model.onnx", path / meta["tokenizer"]
        elif (path / "manifest.json").is_file():
            bundle = Bundle.open(path)
            meta = {**{k: bundle.manifest[k] for k in ("prompt", "eos_ids", "pad_id")},
                    "max_len": bundle.arch["max_len"], "quant": "none", "lora": None}
            onnx_path, tok_path = bundle.decoder_dir / bundle.manifest["decoder"]["file"], bundle.path / bundle.manifest["tokenizer"]
            if route is not None:
                onnx_path = routed_decoder(bundle, route)
                meta["lora"] = (f"arrow top-{route.top_k} over the {route.library} library"
                                + (f", GenKnowSub {', '.join(route.gks)}" if route.gks else ""))
        elif (path / WEIGHTS).is_file():
            raise UserError(f"{path}: this adapt output has no model (written with --no-model, or its search or "
                            f"write-back was interrupted or failed); re-run edgelora adapt to write it")
        else:
            raise UserError(f"{path}: not a model (expected an `edgelora adapt` output folder or a bundle)")
        try:
            tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as e:  # tokenizers raises a bare Exception for a damaged file
            raise UserError(f"{tok_path}: not a readable tokenizer ({str(e).splitlines()[0] if str(e) else e!r})") from None
        return cls(path, Decoder(onnx_path, meta["eos_ids"], threads), tokenizer,
                   PromptFormat.from_dict(meta["prompt"]), meta["max_len"], meta,
                   option_gate=0.0 if route is not None and route.options == "prompt" else 1.0,
                   shots=recipe_shots(meta, path))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def stream_text(self, prompt: str, raw: bool = False, shots: list[Example] | None = None, **kw) -> Iterator[str]:
        """Text pieces as tokens come; a piece is held back while it ends inside a UTF-8 character.
        `shots`: earlier turns before the prompt (default: the recipe's), the oldest dropped whole
        where they would leave no room for --max-new-tokens."""
        room = max(self.max_len - kw.get("max_new_tokens", 128), 1)
        full = self.encode(prompt if raw else self.fmt.fitted(self.encode, prompt, self.shots if shots is None else shots,
                                                              room)[0])
        ids = full[-self.max_len:]
        self.prompt_tokens = (len(full), len(ids))  # as given, as run: the model takes max_len
        out: list[int] = []
        shown = ""
        for tok in self.decoder.stream(ids, max_len=self.max_len, **kw):
            out.append(tok)
            text = self.tokenizer.decode(out)
            if text.endswith("\ufffd"):
                continue
            yield text[len(shown):]
            shown = text

    def answer(self, prompt_ids: list[int], max_new_tokens: int = 32, options: list[str] = ()) -> tuple[str, list[float]]:
        """The generated answer, cut at its first line (all that exact match reads, so decoding
        stops there), and each option's log-prob, both from one prefill of the prompt."""
        prefill = self.decoder.prefill(prompt_ids)
        out: list[int] = []
        text = ""
        for tok in self.decoder.stream(prompt_ids, max_new_tokens=max_new_tokens, prefill=prefill, max_len=self.max_len):
            out.append(tok)
            text = self.tokenizer.decode(out)
            if "\n" in text.lstrip():
                break
        lps = (self.decoder.option_logprobs(prompt_ids, [self.encode(o) for o in options], prefill, self.option_gate)
               if options else [])
        return text, lps


def pick(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy at temperature 0; otherwise nucleus sampling over the softmax."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1]
    return int(rng.choice(keep, p=p[keep] / p[keep].sum()))
