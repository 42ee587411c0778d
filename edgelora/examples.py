"""Examples: read and validate JSONL, and render the prompt format around them.

Every message names the file and the line, because the user wrote that file by hand.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .io import parse_json, read_text


@dataclass(frozen=True)
class Example:
    input: str
    output: str
    options: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    where: str = field(default="", compare=False)  # "file:line", for messages

    @property
    def answers(self) -> tuple[str, ...]:
        """Every accepted answer: exact-match scoring honours the aliases."""
        return (self.output, *self.aliases)


def _string_list(value, key: str, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise UserError(f"{where}: '{key}' must be a list of non-empty strings")
    return tuple(value)


def parse_example(obj, where: str) -> Example:
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object like {{\"input\": ..., \"output\": ...}}")
    for key in ("input", "output"):
        if key not in obj:
            raise UserError(f"{where}: missing field '{key}'")
        if not isinstance(obj[key], str):
            raise UserError(f"{where}: field '{key}' must be a string, got {type(obj[key]).__name__}")
        if not obj[key].strip():
            raise UserError(f"{where}: field '{key}' is empty")
    options = _string_list(obj["options"], "options", where) if "options" in obj else ()
    aliases = _string_list(obj["aliases"], "aliases", where) if "aliases" in obj else ()
    if options and obj["output"] not in options:
        raise UserError(f"{where}: 'output' {obj['output']!r} is not one of its 'options'")
    return Example(obj["input"], obj["output"], options, aliases, where)


# A line longer than this is refused before it is parsed: a prompt is cut to the bundle's
# 1,024 tokens (a few KB of text) anyway, and a runaway line would only eat memory.
MAX_LINE_CHARS = 1 << 20


def load_examples(path: str | Path, warn=lambda msg: print(msg, file=sys.stderr)) -> list[Example]:
    """Read a JSONL file of examples; duplicates are kept but warned about. A UTF-8 byte-order
    mark and Windows line ends (Notepad, Excel) are accepted: they are how people save files."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    text = read_text(path)
    examples: list[Example] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        if len(line) > MAX_LINE_CHARS:
            raise UserError(f"{where}: a line of {len(line):,} characters; the limit is {MAX_LINE_CHARS:,}")
        ex = parse_example(parse_json(line, path, lineno), where)
        key = json.dumps([ex.input, ex.output])
        if key in seen:
            warn(f"warning: {where}: duplicate of line {seen[key]}")
        seen.setdefault(key, lineno)
        examples.append(ex)
    if not examples:
        raise UserError(f"{path}: no examples (expected one JSON object per line)")
    return examples


@dataclass(frozen=True)
class PromptFormat:
    """A chat template rendered once at export time into the pieces around the user's text.

    Rendering it here, with plain string joins, keeps jinja out of the runtime and makes the
    prompt the scorer sees identical to the one the decoder is given.
    """

    head: str            # everything before the first user text (system prompt, user tag)
    mid: str             # between the user text and the assistant's answer
    end: str             # after an answer: closes the assistant turn
    next_user: str       # opens a later user turn (in-context examples)
    stop: str = ""       # the text that ends an answer (also a target, so a model learns to stop)

    @classmethod
    def from_dict(cls, d: dict) -> "PromptFormat":
        return cls(**{k: d[k] for k in ("head", "mid", "end", "next_user", "stop")})

    def prompt(self, text: str, shots: list[Example] = ()) -> str:
        """The prompt up to where the assistant's answer starts; shots become earlier turns."""
        parts = [self.head]
        for ex in shots:
            parts += [ex.input, self.mid, ex.output, self.end, self.next_user]
        parts += [text, self.mid]
        return "".join(parts)

    def fitted(self, encode, text: str, shots: list[Example], room: int) -> tuple[str, int]:
        """The prompt with as many of the last `shots` as keep it within `room` tokens, and how many:
        the oldest are dropped whole, rather than cutting the system turn and a shot in half."""
        for k in range(len(shots), 0, -1):
            prompt = self.prompt(text, list(shots[len(shots) - k:]))
            if len(encode(prompt)) <= room:
                return prompt, k
        return self.prompt(text), 0

    def pairs(self, examples: list[Example]) -> list[tuple[str, str]]:
        """(prompt, target) per example, as scoring and training see them: the answer and the
        stop text are the target, so the loss also teaches the model to stop."""
        return [(self.prompt(e.input), e.output + self.stop) for e in examples]
