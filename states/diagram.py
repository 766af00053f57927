"""State diagrams drawn from the machine definition itself, so docs cannot drift.

``python -m states.diagram`` rewrites the diagram in docs/state-machine.md.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from states.call import TRANSITIONS, State

DOC = Path(__file__).parents[1] / "docs" / "state-machine.md"
BEGIN, END = "```mermaid\n", "```\n"


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def mermaid() -> str:
    """A Mermaid ``stateDiagram-v2``: ``trigger [condition] / action`` on each arrow."""
    lines = ["stateDiagram-v2", f"    [*] --> {State.BOT.value}"]
    for row in TRANSITIONS:
        guard = " ".join(f"[{c}]" for c in _as_list(row.get("conditions")))
        actions = ", ".join(_as_list(row.get("after")))
        label = " ".join(filter(None, [str(row["trigger"]), guard, f"/ {actions}" if actions else ""]))
        for source in _as_list(row["source"]):
            dest = source if row["dest"] is None else str(row["dest"])
            lines.append(f"    {source} --> {dest} : {label}")
    lines.append(f"    {State.ENDED.value} --> [*]")
    return "\n".join(lines) + "\n"


def update_doc(path: Path = DOC) -> bool:
    """Replace the first mermaid block of ``path``; True if it changed."""
    text = path.read_text(encoding="utf-8")
    start = text.index(BEGIN) + len(BEGIN)
    end = text.index(END, start)
    updated = text[:start] + mermaid() + text[end:]
    if updated != text:
        path.write_text(updated, encoding="utf-8")
    return updated != text


if __name__ == "__main__":
    print(f"{DOC}: {'updated' if update_doc() else 'already up to date'}", file=sys.stderr)
