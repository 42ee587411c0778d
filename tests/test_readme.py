"""README's usage lines are derived from the code: every `AdaptConfig` setting is an `adapt` flag
shown with its default, and the two commands README gives are the ones `.ci/run` and a user run."""
from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from edgelora.search import AdaptConfig

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def usage(command: str) -> str:
    """The usage block's lines for `edgelora COMMAND` (its first line and the indented ones after)."""
    lines = README.splitlines()
    start = next(i for i, l in enumerate(lines) if l.strip().startswith(f"edgelora {command} ") and "[--" in l)
    block = [lines[start]]
    for line in lines[start + 1:]:
        if not line.startswith(" " * 12) or line.strip().startswith("edgelora"):
            break
        block.append(line)
    return " ".join(block)


def test_adapt_usage_shows_every_setting_with_its_default():
    text, d = usage("adapt"), AdaptConfig()
    for f in fields(AdaptConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(getattr(d, f.name), bool):  # a switch: shown as the flag that turns the default off
            off = f"[--no-{flag[2:]}]" if getattr(d, f.name) else f"[{flag}]"
            assert off in text, f"README's adapt usage lacks {off}"
            continue
        m = re.search(rf"\[{flag} ([^\]]+)\]", text)
        assert m, f"README's adapt usage lacks {flag}"
        shown, default = m.group(1), getattr(d, f.name)
        if isinstance(default, (int, float)):
            assert float(shown) == default, f"{flag}: README shows {shown}, AdaptConfig says {default}"
        else:
            assert str(default) in shown.split("|"), f"{flag}: README shows {shown}, AdaptConfig says {default}"


def test_ci_runs_the_readme_test_command():
    command = next(l.strip() for l in README.splitlines() if "pytest" in l and l.startswith("    "))
    assert command in (ROOT / ".ci" / "run").read_text()
