"""The scoring graph's input contract: (prompt, target) pairs tokenised once, a long prompt cut
one way, and packed into the arrays the graph takes (`Batch`), built once and fed unchanged at
every evaluation. Training tokenises with the same `tokenize_pairs`, so a LoRA learns on the
tokens that score it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import UserError

# The scoring batch's size, examples x tokens (padded): its activations grow with it (and the
# attention with tokens squared); 16,384 is under a GB at the bundle's 1,024-token limit.
MAX_BATCH_TOKENS = 16384


def check_batch_size(n_examples: int, n_tokens: int, source: str) -> None:
    """Refuse a scoring batch (examples x padded tokens) too large to hold in memory."""
    if n_tokens > MAX_BATCH_TOKENS:
        raise UserError(f"{source}: {n_examples} examples make a batch of {n_tokens:,} tokens (padded); "
                        f"the limit is {MAX_BATCH_TOKENS:,}: use fewer or shorter examples")


@dataclass
class Batch:
    """The examples packed into one sequence for the scoring graph, built once and fed unchanged
    at every evaluation: the prompts' longest common token prefix (the chat header) once, then
    each example's own tokens, with no padding. Positions continue after the prefix for every
    example; `gather_idx` lists each example's rows (prefix, then its own tokens), which is all
    its attention may see; `scatter_idx` is each token's home in the flattened [n, S] rows."""

    input_ids: np.ndarray     # [T] int64
    position_ids: np.ndarray  # [T] int64
    gather_idx: np.ndarray    # [n, S] int64: example i's rows in the packed sequence, then 0s
    scatter_idx: np.ndarray   # [T] int64: index into the flattened [n, S] rows
    target_pos: np.ndarray    # [n, K] int64: packed positions whose next-token prediction is a target
    target_ids: np.ndarray    # [n, K] int64
    target_mask: np.ndarray   # [n, K] float32
    prefix_len: int = 0       # P: tokens shared by every prompt, run once
    rows: list[tuple[list[int], list[int]]] = field(repr=False, default_factory=list)  # (prompt, target) ids

    FEEDS = ("input_ids", "position_ids", "gather_idx", "scatter_idx", "target_pos", "target_ids", "target_mask")

    def feeds(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in self.FEEDS}

    @property
    def n_tokens(self) -> int:
        """Tokens the graph runs: the prefix once, each example's own tokens once."""
        return len(self.input_ids)

    @property
    def padded_tokens(self) -> int:
        """What the same examples cost right-padded to the longest, as a plain batch."""
        return len(self.rows) * max(len(p) + len(t) for p, t in self.rows)


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two sequences share (the packed prefix; the decoder's reused cache)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_pairs(tokenizer, pairs: list[tuple[str, str]], max_len: int) -> tuple[list[tuple[list[int], list[int]]], list[int]]:
    """Token ids of (prompt, target) pairs; prompt and target are encoded apart so the boundary
    is the one generation sees. Returns the rows and the indices of truncated pairs: a long
    prompt loses its start (its end is what the answer depends on)."""
    rows, truncated = [], []
    for i, (prompt, target) in enumerate(pairs):
        p = tokenizer.encode(prompt, add_special_tokens=False).ids
        t = tokenizer.encode(target, add_special_tokens=False).ids
        if not t or not p:
            raise UserError(f"prompt or answer {target!r} has no tokens")
        if len(p) + len(t) > max_len:
            truncated.append(i)
            t = t[: max_len // 2]
            p = p[len(p) - (max_len - len(t)):]
        rows.append((p, t))
    return rows, truncated


def pack(rows: list[tuple[list[int], list[int]]]) -> Batch:
    """Pack (prompt, target) token rows into one sequence: the prompts' common prefix, then each
    example's rest of prompt and its target. Example i's own tokens sit at positions P, P+1, ...
    as if it followed the prefix alone, so every loss equals the one of a separate sequence."""
    prompts = [p for p, _ in rows]
    P = min(common_prefix(prompts[0], p) for p in prompts)
    own = [p[P:] + t for p, t in rows]
    n, S, K = len(rows), P + max(len(o) for o in own), max(len(t) for _, t in rows)
    ids, pos, scatter = list(prompts[0][:P]), list(range(P)), list(range(P))
    gather = np.zeros((n, S), np.int64)
    target_pos = np.zeros((n, K), np.int64)
    target_ids = np.zeros((n, K), np.int64)
    target_mask = np.zeros((n, K), np.float32)
    for i, ((p, t), o) in enumerate(zip(rows, own)):
        start = len(ids)  # where example i's own tokens begin in the packed sequence
        ids += o
        pos += range(P, P + len(o))
        scatter += range(i * S + P, i * S + P + len(o))
        gather[i, :P] = np.arange(P)
        gather[i, P: P + len(o)] = np.arange(start, start + len(o))
        local = np.arange(len(p) - 1, len(p) + len(t) - 1)  # predicts target k, in example-local positions
        target_pos[i, : len(t)] = np.where(local < P, local, start + local - P)
        target_ids[i, : len(t)] = t
        target_mask[i, : len(t)] = 1.0
    return Batch(np.array(ids, np.int64), np.array(pos, np.int64), gather, np.array(scatter, np.int64),
                 target_pos, target_ids, target_mask, P, rows)


def keep_ends(batch: Batch, keep: int) -> Batch:
    """The same examples with each one's own tokens (after the shared chat header) cut to their
    last `keep`, answer included: where the question and the answer lie, so a forward costing
    a fraction of the tokens ranks the library much as the whole examples do
    (bench/results/select_truncated.json). The header stays, so the model still reads a chat turn."""
    P = batch.prefix_len
    return pack([(p[:P] + p[max(P, len(p) - max(keep - len(t), 1)):], t) for p, t in batch.rows])


def encode_pairs(tokenizer, pairs: list[tuple[str, str]], max_len: int) -> tuple[Batch, list[int]]:
    """Tokenise and pack (prompt, target) pairs: the one way prompts become scoring-graph inputs."""
    rows, truncated = tokenize_pairs(tokenizer, pairs, max_len)
    return pack(rows), truncated
