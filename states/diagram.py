"""State diagrams drawn from the machine definition itself, so docs cannot drift.

``mermaid`` and ``dot`` are text and need nothing; ``render`` also makes SVG and PNG
with Graphviz's ``dot`` binary. Each can highlight one state (a call's current one).
``python -m states.diagram`` rewrites the diagram in docs/state-machine.md. The call
flow's diagram (``orchestrator.flow_diagram``) is rendered and put in its doc by the
helpers here too.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from states.call import TRANSITIONS, State

DOC = Path(__file__).parents[1] / "docs" / "state-machine.md"
BEGIN, END = "```mermaid\n", "```\n"

FORMATS = ("mermaid", "dot", "svg", "png")
HIGHLIGHT_FILL, HIGHLIGHT_STROKE = "#ffd54f", "#e65100"
# A highlighted box in DOT, beside its style (which must add ``filled``).
DOT_HIGHLIGHT = f'fillcolor="{HIGHLIGHT_FILL}", color="{HIGHLIGHT_STROKE}", penwidth=3'
GRAPHVIZ_TIMEOUT_SECONDS = 20.0  # the machine has five states: dot takes milliseconds, unless wedged


class DiagramError(ValueError):
    """A diagram that cannot be made: unknown format or state, or Graphviz failed."""


class GraphvizMissing(DiagramError):
    """The format needs Graphviz's ``dot`` and this machine has none."""

    def __init__(self, fmt: str) -> None:
        super().__init__(
            f"the {fmt} format needs Graphviz's `dot` (apt install graphviz); mermaid and dot need nothing"
        )
        self.fmt = fmt


class Arrow(NamedTuple):
    """One drawn transition: an internal one (``dest: None``) is an arrow to itself."""

    source: str
    dest: str
    label: str


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def arrows() -> list[Arrow]:
    """Every arrow of the machine, in ``TRANSITIONS`` order, labelled ``trigger [condition] / action``."""
    drawn = []
    for row in TRANSITIONS:
        guard = " ".join(f"[{c}]" for c in _as_list(row.get("conditions")))
        actions = ", ".join(_as_list(row.get("after")))
        label = " ".join(filter(None, [str(row["trigger"]), guard, f"/ {actions}" if actions else ""]))
        for source in _as_list(row["source"]):
            drawn.append(Arrow(source, source if row["dest"] is None else str(row["dest"]), label))
    return drawn


def _state(highlight: str | None) -> State | None:
    """The state to highlight, checked: a typo must not quietly draw no highlight."""
    if highlight is None:
        return None
    try:
        return State(highlight)
    except ValueError:
        valid = ", ".join(s.value for s in State)
        raise DiagramError(f"unknown state {highlight!r}: valid states are {valid}") from None


def mermaid(highlight: str | None = None) -> str:
    """A Mermaid ``stateDiagram-v2``; ``highlight`` names a state to draw filled."""
    current = _state(highlight)
    lines = ["stateDiagram-v2", f"    [*] --> {State.BOT.value}"]
    lines += [f"    {a.source} --> {a.dest} : {a.label}" for a in arrows()]
    lines.append(f"    {State.ENDED.value} --> [*]")
    if current is not None:
        lines += mermaid_highlight(current.value)
    return "\n".join(lines) + "\n"


def mermaid_highlight(name: str) -> list[str]:
    """The lines of a Mermaid diagram that draw ``name`` (its id there) filled."""
    # Lower-case ``class``, the documented form: transitions 0.9.3 writes ``Class``, which
    # Mermaid 11 accepts only because its lexer ignores case; other readers need not.
    return [
        f"    classDef current fill:{HIGHLIGHT_FILL},stroke:{HIGHLIGHT_STROKE},stroke-width:3px",
        f"    class {name} current",
    ]


def dot_string(text: str) -> str:
    """``text`` as a quoted DOT string, drawn as it is: Graphviz would read ``&amp;`` as
    an entity and ``\\N`` as the node's name. A line break in ``text`` is one in the label."""
    escaped = text.replace("&", "&amp;").replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\n", "\\n") + '"'


def dot(highlight: str | None = None) -> str:
    """The same diagram in Graphviz DOT; ``highlight`` names a state to draw filled."""
    current = _state(highlight)
    lines = [
        "digraph call {",
        "    rankdir=LR;",
        '    node [shape=box, style=rounded, fontname="sans-serif"];',
        '    edge [fontname="sans-serif", fontsize=10];',
        '    __start__ [shape=point, width=0.2, label=""];',
        '    __end__ [shape=doublecircle, style=filled, fillcolor=black, width=0.12, label=""];',
    ]
    filled = f'style="rounded,filled", {DOT_HIGHLIGHT}'
    for state in State:
        lines.append(f"    {dot_string(state.value)}{f' [{filled}]' if state is current else ''};")
    lines.append(f"    __start__ -> {dot_string(State.BOT.value)};")
    lines += [
        f"    {dot_string(a.source)} -> {dot_string(a.dest)} [label={dot_string(a.label)}];" for a in arrows()
    ]
    lines.append(f"    {dot_string(State.ENDED.value)} -> __end__;")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(fmt: str, highlight: str | None = None) -> bytes:
    """The diagram in ``fmt`` (one of ``FORMATS``), optionally highlighting a state.

    Raises ``DiagramError`` for an unknown format or state; see ``render_source``.
    """
    return render_source(fmt, lambda: mermaid(highlight), lambda: dot(highlight))


def render_source(fmt: str, mermaid_text: Callable[[], str], dot_text: Callable[[], str]) -> bytes:
    """A diagram in ``fmt``, from whichever of its Mermaid or DOT source that needs.

    svg and png run Graphviz's ``dot`` (blocking, at most ``GRAPHVIZ_TIMEOUT_SECONDS``):
    call it off the event loop in a server. Raises ``DiagramError`` for an unknown format,
    ``GraphvizMissing`` when ``dot`` is not installed.
    """
    if fmt not in FORMATS:
        raise DiagramError(f"unknown diagram format {fmt!r}: valid formats are {', '.join(FORMATS)}")
    if fmt == "mermaid":
        return mermaid_text().encode()
    source = dot_text()
    if fmt == "dot":
        return source.encode()
    executable = shutil.which("dot")
    if executable is None:
        raise GraphvizMissing(fmt)
    try:
        done = subprocess.run(
            [executable, f"-T{fmt}"],
            input=source.encode(),
            capture_output=True,
            timeout=GRAPHVIZ_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise DiagramError(f"Graphviz `dot -T{fmt}` took over {GRAPHVIZ_TIMEOUT_SECONDS:g}s") from None
    if done.returncode != 0:
        error = done.stderr.decode(errors="replace").strip()
        raise DiagramError(f"Graphviz `dot -T{fmt}` failed ({done.returncode}): {error}")
    return done.stdout


def _block(path: Path, heading: str | None) -> tuple[str, int, int]:
    """``path``'s text and where the body of its first mermaid block is in it, or of the
    one in the section that starts with the line ``heading``."""
    text = path.read_text(encoding="utf-8")
    after, before = 0, len(text)
    if heading is not None:
        at = f"\n{text}".find(f"\n{heading}\n")
        if at < 0:
            raise DiagramError(f"{path}: no line {heading!r} to put the diagram under")
        after = at + len(heading) + 1
        if (next_heading := text.find("\n## ", after)) >= 0:
            before = next_heading
    start = text.find(BEGIN, after, before)
    if start < 0:
        raise DiagramError(f"{path}: no ```mermaid block{f' under {heading!r}' if heading else ''}")
    start += len(BEGIN)
    return text, start, text.index(END, start)


def doc_block(path: Path, heading: str | None = None) -> str:
    """The body of the first mermaid block of ``path`` (in the section ``heading``)."""
    text, start, end = _block(path, heading)
    return text[start:end]


def replace_block(path: Path, body: str, heading: str | None = None) -> bool:
    """Make ``body`` the first mermaid block of ``path`` (in the section ``heading``); True
    if it changed."""
    text, start, end = _block(path, heading)
    updated = text[:start] + body + text[end:]
    if updated != text:
        path.write_text(updated, encoding="utf-8")
    return updated != text


def update_doc(path: Path = DOC) -> bool:
    """Replace the first mermaid block of ``path``; True if it changed."""
    return replace_block(path, mermaid())


if __name__ == "__main__":
    print(f"{DOC}: {'updated' if update_doc() else 'already up to date'}", file=sys.stderr)
