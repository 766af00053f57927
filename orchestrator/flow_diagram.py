"""The call flow drawn from its YAML: a Mermaid ``flowchart`` and Graphviz DOT (SVG, PNG).

Each node kind has its own shape; an arrow is labelled with the keys and phrases of its
route, or the field that leads on (``no_input``, ``on_fail``, ``closed``, ...). What every
waiting node shares, the global routes and default retries, is drawn once, from an
"any menu" note; a transfer's ways back to the node the call last waited at (handback, a
failure with no ``on_failure``) go to a "back" note. Either format can highlight one node
(a call's current one). ``python -m orchestrator.flow_diagram`` rewrites the drawings in
docs/call-flows.md.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from orchestrator.callflow import (
    DEFAULT_CALLFLOW,
    SAMPLE_CALLFLOW,
    Action,
    CallFlow,
    CheckHours,
    Gather,
    Menu,
    TransferTo,
    load_callflow,
    shipped_flow,
)
from states.diagram import (
    DOT_HIGHLIGHT,
    DiagramError,
    dot_string,
    mermaid_highlight,
    render_source,
    replace_block,
)

DOC = Path(__file__).parents[1] / "docs" / "call-flows.md"
# The section of the doc each shipped flow is drawn in.
DOC_SECTIONS = {
    "## The default flow, drawn": DEFAULT_CALLFLOW,
    "## The sample flow, drawn": SAMPLE_CALLFLOW,
    "## The account-lookup flow, drawn": "account-lookup.yaml",
    "## The warm-transfer flow, drawn": "warm-transfer.yaml",
}

# Drawn boxes that are no node of the flow; parentheses keep them apart from node names.
START, ANY, BACK = "(start)", "(any menu)", "(back)"
NOTE = "note"


class Shape(NamedTuple):
    """How a kind of box is drawn: Mermaid's brackets around the label, DOT's shape and style."""

    opening: str
    closing: str
    dot_shape: str
    dot_style: str = ""


SHAPES = {
    "menu": Shape("{{", "}}", "hexagon"),
    "gather": Shape("[/", "/]", "parallelogram"),
    "say": Shape("(", ")", "box", "rounded"),
    "hours": Shape("{", "}", "diamond"),
    "action": Shape("[[", "]]", "component"),
    "transfer": Shape("[(", ")]", "cylinder"),
    "hang_up": Shape("([", "])", "octagon"),
    "start": Shape("((", "))", "circle"),
    NOTE: Shape(">", "]", "note", "dashed"),
}
# A Mermaid id is made from the node's name (readable, and stable as the flow grows) when
# the name is only these characters; other names are numbered.
_PLAIN_ID = re.compile(r"[A-Za-z0-9_]+")
# In a quoted Mermaid label these would end it, or start an entity, a directive
# (%%{...}%%), markdown or HTML: each is written as its entity code (#34; for ").
_MERMAID_SPECIAL = frozenset('"#%&<>`|;\\')


class Box(NamedTuple):
    """One drawn box: a node of the flow, the start, or a note."""

    name: str  # the node's name, or START, ANY, BACK
    label: str
    kind: str  # a key of SHAPES


class Arrow(NamedTuple):
    """One drawn arrow between two boxes, by name."""

    source: str
    dest: str
    label: str  # a line for each way it stands for

    @property
    def dashed(self) -> bool:
        """Arrows from and to notes: no node's own way on."""
        return self.source in (ANY, BACK) or self.dest in (ANY, BACK)


class Drawing(NamedTuple):
    """What is drawn of a flow."""

    boxes: list[Box]
    arrows: list[Arrow]


def _node_label(flow: CallFlow, name: str) -> str:
    """The node's name, and what it works with when its arrows do not say."""
    match flow.nodes[name]:
        case TransferTo(queue=queue):
            pool = flow.queues[queue].pool
            return f"{name} (queue {queue}, pool {pool})" if pool else f"{name} (queue {queue})"
        case CheckHours(hours=hours):
            return f"{name} ({hours} hours)"
        case Gather(into=into):
            return f"{name} (into {into})"
        case Action(action=action):
            return f"{name} ({action})"
        case Menu(global_routes=False):
            return f"{name} (own routes only)"
    return name


def _ordinal(n: int) -> str:
    return f"{n}{'th' if n // 10 % 10 == 1 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def _arrow_label(flow: CallFlow, name: str, how: str) -> str:
    node = flow.nodes[name]
    if how == "next":  # the way on, unless a gather reads the digits back first
        return "confirmed" if isinstance(node, Gather) and node.confirm is not None else ""
    if isinstance(node, Menu | Gather) and how in ("no_input", "no_match"):
        retry = flow.retry_of(node, how)
        assert retry is not None and retry.max is not None  # it has a ``then``: max goes with it
        return f"{_ordinal(retry.max + 1)} {how}"  # ``max`` retries, then the next one goes on
    return " ".join(how.split())  # one line: a phrase may hold a line break


def _joined(labels: Iterable[str]) -> str:
    """One arrow's label for all its ways, a line each; an unlabelled way (``next``) beside
    others is named, or it would read as one of them."""
    lines = list(labels)
    return "\n".join(line or "next" for line in lines) if len(lines) > 1 else lines[0]


def drawing(flow: CallFlow) -> Drawing:
    """The boxes and arrows: each node's own ways on (``CallFlow.edges``), then the shared
    ones once, from the "any menu" note. Ways between the same two boxes are one arrow,
    its label a line for each."""
    ways: dict[tuple[str, str], dict[str, None]] = {(START, flow.start): {"": None}}
    shared: dict[tuple[str, str], dict[str, None]] = {}  # dicts: in order, each once
    shared_by_gathers = False
    for name, node in flow.nodes.items():
        for edge in flow.edges(name):
            label = _arrow_label(flow, name, edge.how)
            ends = (ANY if edge.shared else name, edge.to or BACK)
            (shared if edge.shared else ways).setdefault(ends, {})[label] = None
            shared_by_gathers |= edge.shared and isinstance(node, Gather)
    boxes = [Box(START, "start", "start")]
    boxes += [Box(name, _node_label(flow, name), node.type) for name, node in flow.nodes.items()]
    if shared:
        boxes.append(Box(ANY, "any menu or gather" if shared_by_gathers else "any menu", NOTE))
    if any(dest == BACK for _, dest in ways):
        boxes.append(Box(BACK, "back where the call waited", NOTE))
    arrows = [Arrow(*ends, _joined(labels)) for ends, labels in [*ways.items(), *shared.items()]]
    return Drawing(boxes, arrows)


def _checked(flow: CallFlow, highlight: str | None) -> str | None:
    """The node to highlight, checked: a typo must not quietly draw no highlight."""
    if highlight is not None and highlight not in flow.nodes:
        raise DiagramError(f"unknown node {highlight!r}: this flow's nodes are {', '.join(flow.nodes)}")
    return highlight


def _mermaid_ids(flow: CallFlow) -> dict[str, str]:
    ids = {START: "start_", ANY: "any_", BACK: "back_"}
    for i, name in enumerate(flow.nodes):
        ids[name] = f"n_{name}" if _PLAIN_ID.fullmatch(name) else f"n{i}"
    return ids


def _mermaid_text(text: str) -> str:
    """``text`` as a quoted Mermaid label, a line for each of its lines."""
    escaped = "".join(f"#{ord(c)};" if c in _MERMAID_SPECIAL else c for c in text)
    return '"' + escaped.replace("\n", "<br>") + '"'


def mermaid(flow: CallFlow, highlight: str | None = None) -> str:
    """A Mermaid ``flowchart``; ``highlight`` names a node to draw filled."""
    current = _checked(flow, highlight)
    boxes, arrows = drawing(flow)
    ids = _mermaid_ids(flow)
    lines = ["flowchart TD"]
    for box in boxes:
        shape = SHAPES[box.kind]
        lines.append(f"    {ids[box.name]}{shape.opening}{_mermaid_text(box.label)}{shape.closing}")
    for arrow in arrows:
        label = f"|{_mermaid_text(arrow.label)}|" if arrow.label else ""
        lines.append(f"    {ids[arrow.source]} {'-.->' if arrow.dashed else '-->'}{label} {ids[arrow.dest]}")
    if notes := [ids[box.name] for box in boxes if box.kind == NOTE]:
        lines.append("    classDef note stroke-dasharray:5 3")
        lines.append(f"    class {','.join(notes)} note")
    if current is not None:
        lines += mermaid_highlight(ids[current])
    return "\n".join(lines) + "\n"


def dot(flow: CallFlow, highlight: str | None = None) -> str:
    """The same drawing in Graphviz DOT; ``highlight`` names a node to draw filled."""
    current = _checked(flow, highlight)
    boxes, arrows = drawing(flow)
    lines = [
        "digraph flow {",
        '    node [fontname="sans-serif"];',
        '    edge [fontname="sans-serif", fontsize=10];',
    ]
    for box in boxes:
        shape = SHAPES[box.kind]
        attributes = [f"shape={shape.dot_shape}", f"label={dot_string(box.label)}"]
        style = [shape.dot_style] if shape.dot_style else []
        if box.name == current:
            style.append("filled")
            attributes.append(DOT_HIGHLIGHT)
        if style:
            attributes.append(f"style={dot_string(','.join(style))}")
        lines.append(f"    {dot_string(box.name)} [{', '.join(attributes)}];")
    for arrow in arrows:
        attributes = [f"label={dot_string(arrow.label)}"] if arrow.label else []
        if arrow.dashed:
            attributes.append("style=dashed")
        listed = f" [{', '.join(attributes)}]" if attributes else ""
        lines.append(f"    {dot_string(arrow.source)} -> {dot_string(arrow.dest)}{listed};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(flow: CallFlow, fmt: str, highlight: str | None = None) -> bytes:
    """The drawing in ``fmt`` (``states.diagram.FORMATS``), optionally highlighting a node.

    Raises ``DiagramError`` for an unknown format or node (see ``render_source``).
    """
    return render_source(fmt, lambda: mermaid(flow, highlight), lambda: dot(flow, highlight))


def update_doc(path: Path = DOC) -> bool:
    """Redraw each shipped flow in its section of ``path``; True if any changed."""
    changed = [
        replace_block(path, mermaid(load_callflow(shipped_flow(name))), heading)
        for heading, name in DOC_SECTIONS.items()
    ]
    return any(changed)


if __name__ == "__main__":
    print(f"{DOC}: {'updated' if update_doc() else 'already up to date'}", file=sys.stderr)
