"""The call flow's drawings: every node and way on of the shipped flows, the Mermaid text
rendered by the real Mermaid in headless Chromium and the DOT by the real Graphviz, names
no drawing syntax may trip on, the highlight, and the drawings in docs/call-flows.md."""

from __future__ import annotations

import re
import subprocess
import xml.etree.ElementTree as ET
from collections import Counter
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Page

from orchestrator.callflow import (
    DEFAULT_CALLFLOW,
    SAMPLE_CALLFLOW,
    Action,
    CallFlow,
    CheckHours,
    Edge,
    Gather,
    HangUp,
    Menu,
    Queue,
    Route,
    Say,
    TransferTo,
    load_callflow,
    shipped_flow,
)
from orchestrator.callflow import (
    FLOWS as FLOWS_DIR,
)
from orchestrator.flow_diagram import (
    ANY,
    BACK,
    DOC,
    DOC_SECTIONS,
    NOTE,
    SHAPES,
    START,
    Arrow,
    dot,
    drawing,
    mermaid,
    render,
    update_doc,
)
from states.diagram import FORMATS, HIGHLIGHT_FILL, DiagramError, doc_block
from tests.test_callflow import parse_doc, rich_doc
from tests.test_diagram import (
    HIGHLIGHT_RGB,
    SVG,
    drawn,
    mermaid_page_fixture,  # noqa: F401 (the fixture mermaid_page)
    overlaps,
    png_size,
    require_dot,
    svg_nodes,
)

SHIPPED = sorted(f.name for f in FLOWS_DIR.iterdir() if f.name.endswith(".yaml"))
FLOWS = {name: load_callflow(shipped_flow(name)) for name in SHIPPED}
RICH = parse_doc(rich_doc())  # the default flow with an hours check and an action: every kind
FLOW_NODES = "svg g.node"

# Names the YAML schema allows that mean something to Mermaid or DOT.
AWKWARD_NAMES = [
    "end",
    "graph",
    "subgraph",
    "class",
    "style",
    "default",
    "1",
    "-",
    "a-b",
    "o",
    "x",
    "node",
    "edge",
    "strict",
]
# And names no flow file may have (a flow built past validation): the drawing must not care.
HOSTILE = [
    'say "hi"',
    "[a] {b} (c)",
    "ünïcødé ✓ 日本",
    "a -->|x| b; c",
    'x %%{init: {"theme": "dark"}}%%',  # Graphviz titles a node whose name starts with % by number
    "<img src=x onerror=alert(1)>",
    "#35; &amp; \\ `tick` ; |",
]


def hostile_flow() -> CallFlow:
    """A flow of every node kind, each named by one of ``HOSTILE``, and routes of hostile phrases."""
    menu, say, gather, hours, action, transfer, hang_up = HOSTILE
    route = Route.model_construct(key="1", phrases=['"quoted" [x]', "a|b;c#d%%e<f>"], to=say)
    nodes = {
        menu: Menu.model_construct(type="menu", routes=[route]),
        say: Say.model_construct(type="say", next=gather),
        gather: Gather.model_construct(
            type="gather", into="v", confirm="p", next=hours, on_fail=hang_up, no_input=None
        ),
        hours: CheckHours.model_construct(type="hours", hours="h ✓", open=action, closed=hang_up),
        action: Action.model_construct(type="action", action="m:f", next=transfer, on_error=menu),
        transfer: TransferTo.model_construct(type="transfer", queue='q "1"'),
        hang_up: HangUp.model_construct(type="hang_up"),
    }
    queue = Queue.model_construct(targets=["+14255550100"], on_failure=menu, after_final=hang_up)
    glob = Route.model_construct(phrases=["back\nhome ✓"], to=menu)
    return CallFlow.model_construct(
        prompts={}, start=menu, routes=[glob], nodes=nodes, queues={'q "1"': queue}
    )


def awkward_flow() -> CallFlow:
    """A valid flow whose nodes are named ``AWKWARD_NAMES``: a chain of menus, then a hang-up."""
    names = AWKWARD_NAMES
    nodes: dict[str, Any] = {
        a: {"type": "menu", "routes": [{"key": "1", "to": b}]} for a, b in pairwise(names)
    }
    nodes[names[-1]] = {"type": "hang_up"}
    return parse_doc({"prompts": {}, "start": names[0], "nodes": nodes})


def labels(arrows: list[Arrow]) -> set[str]:
    return {arrow.label for arrow in arrows if arrow.label}


def box_labels(flow: CallFlow) -> list[str]:
    return [box.label for box in drawing(flow).boxes]


# --- what is drawn -----------------------------------------------------------------------


@pytest.mark.parametrize("flow", [*FLOWS.values(), RICH], ids=[*FLOWS, "rich"])
def test_every_node_and_every_way_on_is_drawn(flow: CallFlow) -> None:
    boxes, arrows = drawing(flow)
    assert [(box.name, box.kind) for box in boxes if box.kind not in (NOTE, "start")] == [
        (name, node.type) for name, node in flow.nodes.items()
    ]
    assert {box.kind for box in boxes} <= set(SHAPES)
    drawn_lines = {(a.source, a.dest): a.label.split("\n") for a in arrows}
    assert len(drawn_lines) == len(arrows)  # one arrow between two boxes
    assert drawn_lines.pop((START, flow.start)) == [""]
    expected: set[tuple[str, str]] = set()
    for name in flow.nodes:
        for edge in flow.edges(name):
            ends = (ANY if edge.shared else name, edge.to or BACK)
            expected.add(ends)
            lines = drawn_lines.get(ends, [])
            if edge.how == "next":
                assert {"", "next", "confirmed"} & set(lines), (name, edge, lines)
            elif edge.how in ("no_input", "no_match"):
                assert any(line.endswith(f" {edge.how}") for line in lines), (name, edge, lines)
            else:
                assert edge.how in lines, (name, edge, lines)
    assert set(drawn_lines) == expected  # and no arrow that is no way on
    notes = {box.name for box in boxes if box.kind == NOTE}
    assert notes == {end for ends in expected for end in ends} & {ANY, BACK}


def test_the_default_flow_drawn() -> None:
    """What the arrows say, in the default flow's own words."""
    flow = FLOWS[DEFAULT_CALLFLOW]
    arrows = {(a.source, a.dest): a.label for a in drawing(flow).arrows}
    assert arrows[("main", "billing")] == 'press 1 / "billing" / "one"'
    assert arrows[("account", "billing_queue")] == "confirmed"  # read back first
    assert arrows[("account", "no_account")] == "on_fail"
    assert arrows[("notice", "main")] == ""
    assert arrows[("billing_queue", "closed")] == "closed"
    assert arrows[("billing_queue", "billing_retry")] == "transfer failed"
    assert arrows[("billing_queue", "goodbye")] == "no attempts left"
    assert arrows[("billing_queue", BACK)] == "handback"
    # The global routes and default retries, once, from the note: not from each menu.
    route, retry = arrows[(ANY, "agent")].split("\n")
    assert route == 'press 0 / "agent" / "operator"'
    assert re.fullmatch(rf"{(flow.defaults.no_match.max or 0) + 1}\w\w no_match", retry), retry
    assert ("main", "agent") not in arrows and ("billing", "goodbye") not in arrows
    boxes = {box.name: box.label for box in drawing(flow).boxes}
    assert boxes[ANY] == "any menu or gather"  # the account gather takes the spoken ones
    assert boxes["agent"] == "agent (queue reception)"
    assert boxes["account"] == "account (into account)"


def test_the_sample_flow_drawn() -> None:
    flow = FLOWS[SAMPLE_CALLFLOW]
    assert drawing(flow).arrows == [
        Arrow(START, "main", ""),
        # No on_failure or after_final: a failed transfer waits where the call was.
        Arrow("agent", BACK, "transfer failed\nno attempts left\nhandback"),
        Arrow(ANY, "billing", 'press 1 / "1" / "one"'),
        Arrow(ANY, "agent", 'press 0 / "0" / "talk to agent"'),
    ]
    assert [box.label for box in drawing(flow).boxes][-2:] == ["any menu", "back where the call waited"]


def test_edges_say_which_ways_on_are_shared() -> None:
    flow = FLOWS[DEFAULT_CALLFLOW]
    main = list(flow.edges("main"))
    assert Edge('press 1 / "billing" / "one"', "billing") in main  # its own route
    assert Edge('press 9 / "main menu"', "main", shared=True) in main  # a global one
    assert Edge("no_input", "goodbye", shared=True) in main  # the default retry
    account = list(flow.edges("account"))
    assert Edge('"goodbye" / "bye"', "goodbye", shared=True) in account  # taken by voice
    assert list(flow.edges("agent"))[-1] == Edge("handback", None)
    doc = rich_doc()
    doc["nodes"]["main"] |= {"global_routes": False, "no_match": {"max": 1, "then": "goodbye"}}
    own = parse_doc(doc)
    edges = list(own.edges("main"))
    assert [e.how for e in edges if e.shared] == ["no_input"]  # the default's, as before
    assert Edge("no_match", "goodbye") in edges  # its own, drawn from it
    from_main = [arrow for arrow in drawing(own).arrows if arrow.source == "main"]
    assert from_main == [
        Arrow("main", "billing", 'press 1 / "billing" / "one"'),
        Arrow("main", "support", 'press 2 / "support" / "technical support"'),
        Arrow("main", "goodbye", "2nd no_match"),
    ]
    assert "main (own routes only)" in box_labels(own)


@pytest.mark.parametrize(
    ("retries", "label"),
    [(0, "1st"), (1, "2nd"), (2, "3rd"), (3, "4th"), (10, "11th"), (11, "12th"), (12, "13th"), (20, "21st")],
)
def test_a_retry_arrow_counts_the_input_that_goes_on(retries: int, label: str) -> None:
    doc = rich_doc()
    doc["defaults"]["no_match"]["max"] = retries
    assert (
        Arrow(ANY, "agent", f'press 0 / "agent" / "operator"\n{label} no_match')
        in drawing(parse_doc(doc)).arrows
    )


# --- Mermaid, in the browser -------------------------------------------------------------


async def flow_problems(page: Page, flow: CallFlow, text: str, highlight: str | None) -> list[str]:
    """What is wrong with ``text`` drawn as ``flow``; empty when nothing is."""
    result = await drawn(page, text, FLOW_NODES)
    if "error" in result:
        return [f"Mermaid rejected it: {result['error']}"]
    found = []
    boxes, arrows = drawing(flow)
    if Counter(node["name"] for node in result["nodes"]) != Counter(box.label for box in boxes):
        found.append(f"boxes drawn {sorted(n['name'] for n in result['nodes'])}")
    if set(result["labels"]) != labels(arrows):
        found.append(f"arrow labels drawn {sorted(result['labels'])}, expected {sorted(labels(arrows))}")
    if result["edges"] != len(arrows):
        found.append(f"{result['edges']} arrows drawn, expected {len(arrows)}")
    filled = [node["name"] for node in result["nodes"] if node["fill"] == HIGHLIGHT_RGB]
    want = [box.label for box in boxes if box.name == highlight]
    if filled != want:
        found.append(f"highlighted {filled}, expected {want}")
    return found + overlaps([node["box"] for node in result["nodes"]])


async def test_mermaid_draws_both_flows_every_node_highlighted(mermaid_page: Page) -> None:
    found = {}
    for name, flow in [*FLOWS.items(), ("rich", RICH)]:
        for highlight in [None, *flow.nodes]:
            found[f"{name} {highlight}"] = await flow_problems(
                mermaid_page, flow, mermaid(flow, highlight), highlight
            )
    for heading, name in DOC_SECTIONS.items():
        found[heading] = await flow_problems(mermaid_page, FLOWS[name], doc_block(DOC, heading), None)
    assert {name: wrong for name, wrong in found.items() if wrong} == {}


async def test_mermaid_draws_any_name_as_it_is(mermaid_page: Page) -> None:
    found = {}
    for flow in (awkward_flow(), hostile_flow()):
        for highlight in [None, *flow.nodes]:
            found[highlight] = await flow_problems(mermaid_page, flow, mermaid(flow, highlight), highlight)
    assert {name: wrong for name, wrong in found.items() if wrong} == {}
    # Nothing in a label ran or styled anything.
    assert await mermaid_page.evaluate("document.querySelectorAll('svg img, svg script').length") == 0


# Each breaks the drawing the way a generator bug could; the check above must see every one.
BROKEN = {
    "a raw quote": ("#34;", '"'),
    "a missing box": ("    n_goodbye", "    %% n_goodbye"),
    "an arrow less": ("    n_support --> n_support_queue\n", ""),
    "a misspelt class": ("class n_main current", "class n_mian current"),
}


async def test_the_mermaid_check_catches_a_broken_drawing(mermaid_page: Page) -> None:
    flow = FLOWS[DEFAULT_CALLFLOW]
    text = mermaid(flow, "main")
    assert await flow_problems(mermaid_page, flow, text, "main") == []
    missed = []
    for name, (old, new) in BROKEN.items():
        assert old in text, name
        if not await flow_problems(mermaid_page, flow, text.replace(old, new, 1), "main"):
            missed.append(name)
    assert missed == []


# --- Graphviz ----------------------------------------------------------------------------


def svg_texts(svg: bytes) -> list[str]:
    return [t.text or "" for t in ET.fromstring(svg).iter(f"{SVG}text")]


@pytest.mark.parametrize(
    "flow",
    [*FLOWS.values(), RICH, awkward_flow(), hostile_flow()],
    ids=[*FLOWS, "rich", "awkward", "hostile"],
)
def test_graphviz_draws_every_box_and_label(flow: CallFlow) -> None:
    require_dot()
    highlight = list(flow.nodes)[-1]
    svg = render(flow, "svg", highlight)
    boxes, arrows = drawing(flow)
    # A node's title is its name, a backslash in it still escaped.
    nodes = {title.replace("\\\\", "\\"): fills for title, fills in svg_nodes(svg).items()}
    assert set(nodes) == {box.name for box in boxes}
    texts = Counter(svg_texts(svg))
    lines = Counter(line for arrow in arrows if arrow.label for line in arrow.label.split("\n"))
    assert lines + Counter(box.label for box in boxes) <= texts
    assert [name for name, fills in nodes.items() if HIGHLIGHT_FILL in fills] == [highlight]
    edges = [g for g in ET.fromstring(svg).iter(f"{SVG}g") if g.get("class") == "edge"]
    assert len(edges) == len(arrows)


def test_graphviz_reads_the_dot_without_a_warning() -> None:
    for flow in (*FLOWS.values(), RICH, hostile_flow()):
        done = subprocess.run(
            [require_dot(), "-Tsvg"], input=render(flow, "dot"), capture_output=True, timeout=30, check=False
        )
        assert done.returncode == 0 and done.stderr == b"", done.stderr


def test_png_is_a_png() -> None:
    require_dot()
    width, height = png_size(render(FLOWS[DEFAULT_CALLFLOW], "png", "account"))
    assert width > 500 and height > 500, (width, height)


def test_dot_fills_only_the_highlighted_node() -> None:
    flow = FLOWS[DEFAULT_CALLFLOW]
    lines = [line for line in dot(flow, "notice").splitlines() if HIGHLIGHT_FILL in line]
    assert len(lines) == 1 and lines[0].startswith('    "notice" ['), lines
    assert 'style="rounded,filled"' in lines[0]  # the say node keeps its rounded corners
    assert HIGHLIGHT_FILL not in dot(flow) and HIGHLIGHT_FILL not in mermaid(flow)


def test_an_unknown_node_or_format_is_a_clear_error() -> None:
    flow = FLOWS[SAMPLE_CALLFLOW]
    for fmt in FORMATS:
        with pytest.raises(
            DiagramError, match=r"^unknown node 'nope': this flow's nodes are main, billing, agent$"
        ):
            render(flow, fmt, "nope")
    with pytest.raises(DiagramError, match="unknown node 'Main'"):
        mermaid(flow, "Main")  # names are as written: no guessing
    with pytest.raises(DiagramError, match="unknown node"):
        dot(flow, START)  # the drawing's own boxes are no nodes
    with pytest.raises(DiagramError, match="unknown diagram format 'gif'"):
        render(flow, "gif")


def test_mermaid_and_dot_need_no_graphviz(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    flow = FLOWS[DEFAULT_CALLFLOW]
    assert render(flow, "mermaid", "main") == mermaid(flow, "main").encode()
    assert render(flow, "dot") == dot(flow).encode()
    with pytest.raises(DiagramError, match="needs Graphviz"):
        render(flow, "svg")


# --- the doc -----------------------------------------------------------------------------


@pytest.mark.parametrize(("heading", "name"), DOC_SECTIONS.items())
def test_the_docs_drawings_are_the_shipped_flows(heading: str, name: str) -> None:
    assert doc_block(DOC, heading) == mermaid(FLOWS[name]), (
        "docs/call-flows.md is out of date: run `python -m orchestrator.flow_diagram`"
    )


def test_update_doc_rewrites_only_its_blocks(tmp_path: Path) -> None:
    doc = tmp_path / "call-flows.md"
    sections = "".join(f"{heading}\n\nWords.\n\n```mermaid\nstale\n```\n\n" for heading in DOC_SECTIONS)
    other = "## Another section\n\n```mermaid\nflowchart TD\n    a --> b\n```\n\n```yaml\nstart: x\n```\n"
    doc.write_text(f"# Call flows\n\n{other}\n{sections}{other}", encoding="utf-8")
    assert update_doc(doc) is True
    text = doc.read_text(encoding="utf-8")
    assert text.count(other) == 2 and "stale" not in text
    for heading, name in DOC_SECTIONS.items():
        assert doc_block(doc, heading) == mermaid(FLOWS[name])
    assert update_doc(doc) is False and doc.read_text(encoding="utf-8") == text


def test_update_doc_names_a_missing_section(tmp_path: Path) -> None:
    doc = tmp_path / "call-flows.md"
    heading = next(iter(DOC_SECTIONS))
    doc.write_text(f"# Call flows\n\n{heading}\n\nNo drawing yet.\n\n## Next\n\n```mermaid\nx\n```\n")
    with pytest.raises(DiagramError, match=f"no ```mermaid block under '{heading}'"):
        update_doc(doc)
    doc.write_text("# Call flows\n")
    with pytest.raises(DiagramError, match=f"no line '{heading}'"):
        update_doc(doc)
