"""The state diagrams: Mermaid text rendered by the real Mermaid in headless Chromium, and
the Graphviz formats rendered by the real ``dot``."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Page

import states.diagram as diagram
from states.call import TRANSITIONS, State
from states.diagram import (
    DOC,
    FORMATS,
    HIGHLIGHT_FILL,
    DiagramError,
    GraphvizMissing,
    arrows,
    doc_block,
    dot,
    mermaid,
    render,
)
from tests.servers import IN_CI

MERMAID_JS = Path(__file__).parent / "browser" / "node_modules" / "mermaid" / "dist" / "mermaid.min.js"
HIGHLIGHT_RGB = "rgb(255, 213, 79)"  # HIGHLIGHT_FILL as the browser computes it
SVG = "{http://www.w3.org/2000/svg}"
STATES = [s.value for s in State]
LABELS = {a.label for a in arrows()}
HIGHLIGHTS = [None, *STATES]


def require(ok: bool, message: str) -> None:
    """Skip without the tool locally; under CI=true a missing tool is a failure."""
    if not ok:
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


# --- Mermaid, in the browser -------------------------------------------------------------

# Renders ``text`` with Mermaid into the page and reports what was drawn: the nodes (those
# ``selector`` finds) with the fill the browser computed for their shape and their boxes,
# the edge labels (a line break in one is a newline), and how many edges.
RENDER_JS = """async ([text, selector]) => {
    try { await mermaid.parse(text); } catch (e) { return {error: String((e && e.message) || e)}; }
    window.renders = (window.renders || 0) + 1;
    const {svg} = await mermaid.render(`diagram${window.renders}`, text);
    document.body.innerHTML = svg;
    const nodes = [...document.querySelectorAll(selector)].map((g) => {
        const shape = g.querySelector("rect, path, polygon, circle");
        const box = g.getBoundingClientRect();
        return {name: g.textContent.trim(), fill: getComputedStyle(shape).fill,
                box: [box.x, box.y, box.width, box.height]};
    });
    const labels = [...document.querySelectorAll("svg .edgeLabel")].map((e) => {
        e.querySelectorAll("br").forEach((br) => br.replaceWith("\\n"));
        return e.textContent.trim();
    });
    const edges = document.querySelectorAll("svg .edgePaths > path, svg .edgePath path.path").length;
    return {nodes, labels: labels.filter((l) => l), edges};
}"""
STATE_NODES = "svg g.node.statediagram-state"


@pytest.fixture(name="mermaid_page")  # named apart from the function: other modules import it
async def mermaid_page_fixture(browser_page: Page) -> Page:
    """A page with the pinned Mermaid loaded from tests/browser/node_modules.

    Loading it costs a second or two per page, so each test draws many diagrams in one.
    """
    require(MERMAID_JS.exists(), f"{MERMAID_JS} is missing: run scripts/ensure-browser")
    await browser_page.set_content("<!doctype html><html><head></head><body></body></html>")
    await browser_page.add_script_tag(path=MERMAID_JS)
    await browser_page.evaluate("mermaid.initialize({startOnLoad: false, securityLevel: 'strict'})")
    return browser_page


async def drawn(page: Page, text: str, selector: str) -> dict[str, Any]:
    """What Mermaid drew of ``text`` (see ``RENDER_JS``); ``error`` when it refused it."""
    result: dict[str, Any] = await page.evaluate(RENDER_JS, [text, selector])
    return result


def overlaps(boxes: list[list[float]]) -> list[str]:
    """Drawn for real: every node has a box of its own, none on top of another."""
    found = []
    if not all(w > 10 and h > 10 for _, _, w, h in boxes):
        found.append(f"nodes without a visible box: {boxes}")
    for i, (x1, y1, w1, h1) in enumerate(boxes):
        for x2, y2, w2, h2 in boxes[i + 1 :]:
            if not (x1 + w1 <= x2 or x2 + w2 <= x1 or y1 + h1 <= y2 or y2 + h2 <= y1):
                found.append(f"overlapping nodes: {boxes}")
    return found


async def problems(page: Page, text: str, highlight: str | None) -> list[str]:
    """What is wrong with ``text`` drawn as a diagram of the machine; empty when nothing is."""
    result = await drawn(page, text, STATE_NODES)
    if "error" in result:
        return [f"Mermaid rejected it: {result['error']}"]
    found = []
    names = Counter(node["name"] for node in result["nodes"])
    if names != Counter(STATES):
        found.append(f"states drawn {sorted(names.elements())}, expected {sorted(STATES)}")
    if set(result["labels"]) != LABELS:
        found.append(f"arrow labels drawn {sorted(set(result['labels']))}, expected {sorted(LABELS)}")
    filled = sorted(node["name"] for node in result["nodes"] if node["fill"] == HIGHLIGHT_RGB)
    if filled != ([highlight] if highlight else []):
        found.append(f"highlighted {filled}, expected {highlight!r}")
    return found + overlaps([node["box"] for node in result["nodes"]])


async def test_mermaid_draws_every_state_arrow_and_highlight(mermaid_page: Page) -> None:
    found = {f"highlight={h}": await problems(mermaid_page, mermaid(h), h) for h in HIGHLIGHTS}
    found["docs/state-machine.md"] = await problems(mermaid_page, doc_block(DOC), None)
    assert {name: wrong for name, wrong in found.items() if wrong} == {}


# Each of these is the highlighted diagram broken in a way a generator bug could break it;
# the check above must catch every one. (``Class`` for ``class``, as transitions 0.9.3
# writes it, is not here: Mermaid 11's lexer ignores case and draws it correctly.)
BROKEN = {
    "quoted state": ("class failed current", 'class "failed" current'),  # Mermaid rejects it
    "one-dash arrow": ("bot --> ended", "bot -> ended"),  # rejected
    "misspelt keyword": ("class failed current", "klass failed current"),  # draws two stray states
    "misspelt state": ("class failed current", "class faild current"),  # highlights nothing
    "undefined class": ("class failed current", "class failed curent"),  # a class with no style
    "semicolon in a label": (": resume", ": resume; retry"),  # splits into stray states
}


async def test_the_mermaid_check_catches_a_broken_diagram(mermaid_page: Page) -> None:
    text = mermaid("failed")
    assert await problems(mermaid_page, text, "failed") == []  # the control: unbroken, it passes
    missed = []
    for name, (old, new) in BROKEN.items():
        assert old in text, name
        if not await problems(mermaid_page, text.replace(old, new, 1), "failed"):
            missed.append(name)
    assert missed == []


async def test_a_screenshot_of_the_highlighted_diagram(mermaid_page: Page, tmp_path: Path) -> None:
    assert await problems(mermaid_page, mermaid("transferring"), "transferring") == []
    shot = tmp_path / "state-machine.png"
    await mermaid_page.locator("svg").first.screenshot(path=shot)
    width, height = png_size(shot.read_bytes())
    assert width > 300 and height > 300, (width, height)


# --- Graphviz ----------------------------------------------------------------------------


def require_dot() -> str:
    path = shutil.which("dot")
    require(path is not None, "Graphviz's dot is not installed: run scripts/ensure-browser")
    assert path is not None
    return path


def png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(b"\x89PNG\r\n\x1a\n"), data[:16]
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def svg_nodes(svg: bytes) -> dict[str, set[str]]:
    """Graphviz node title -> the fills of its shapes."""
    root = ET.fromstring(svg)
    nodes = {}
    for group in root.iter(f"{SVG}g"):
        if group.get("class") == "node":
            title = group.findtext(f"{SVG}title")
            assert title is not None
            nodes[title] = {shape.get("fill", "") for shape in group if shape.tag != f"{SVG}title"}
    return nodes


def test_mermaid_and_dot_draw_the_same_labelled_arrows() -> None:
    in_mermaid = re.findall(r"^    (\w+) --> (\w+) : (.+)$", mermaid(), re.M)
    in_dot = re.findall(r'^    "(\w+)" -> "(\w+)" \[label="(.+)"\];$', dot(), re.M)
    assert Counter(in_dot) == Counter(in_mermaid)
    assert len(in_dot) == sum(len(r["source"]) if isinstance(r["source"], list) else 1 for r in TRANSITIONS)
    assert ("failed", "failed", "request_agent / say_no_agents") in in_dot  # internal: to itself
    assert ("bot", "transferring", "request_agent [has_attempts_left] / start_transfer") in in_dot
    assert re.search(r'^    __start__ -> "bot";$', dot(), re.M)
    assert re.search(r'^    "ended" -> __end__;$', dot(), re.M)


@pytest.mark.parametrize("highlight", HIGHLIGHTS)
def test_graphviz_reads_the_dot_source(highlight: str | None) -> None:
    done = subprocess.run(
        [require_dot(), "-Tsvg"], input=render("dot", highlight), capture_output=True, timeout=30, check=False
    )
    assert done.returncode == 0 and done.stderr == b"", done.stderr
    assert set(svg_nodes(done.stdout)) == {*STATES, "__start__", "__end__"}


@pytest.mark.parametrize("highlight", HIGHLIGHTS)
def test_svg_has_every_state_and_label_and_only_the_highlight_filled(highlight: str | None) -> None:
    require_dot()
    svg = render("svg", highlight)
    nodes = svg_nodes(svg)
    assert set(nodes) == {*STATES, "__start__", "__end__"}
    texts = {t.text for t in ET.fromstring(svg).iter(f"{SVG}text")}
    assert {*STATES, *LABELS} <= texts
    assert sorted(name for name, fills in nodes.items() if HIGHLIGHT_FILL in fills) == (
        [highlight] if highlight else []
    )


def test_dot_fills_only_the_highlighted_state() -> None:
    lines = [line for line in dot("accepted").splitlines() if HIGHLIGHT_FILL in line]
    assert len(lines) == 1 and lines[0].startswith('    "accepted" ['), lines
    assert HIGHLIGHT_FILL not in dot()


def test_png_is_a_png() -> None:
    require_dot()
    width, height = png_size(render("png", State.FAILED))
    assert width > 300 and height > 100, (width, height)


def test_mermaid_and_dot_need_no_graphviz(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no dot on it
    assert render("mermaid") == mermaid().encode()
    assert render("dot", "bot") == dot("bot").encode()
    for fmt in ("svg", "png"):
        with pytest.raises(GraphvizMissing) as missing:
            render(fmt)
        assert isinstance(missing.value, DiagramError)
        assert str(missing.value) == (
            f"the {fmt} format needs Graphviz's `dot` (apt install graphviz); mermaid and dot need nothing"
        )


def test_unknown_state_or_format_names_the_valid_ones() -> None:
    for fmt in FORMATS:
        with pytest.raises(DiagramError, match="unknown state 'nope': valid states are bot, transferring"):
            render(fmt, "nope")
    with pytest.raises(DiagramError, match="unknown state 'Bot'"):
        mermaid("Bot")  # stored values are lower-case: no guessing
    with pytest.raises(
        DiagramError, match="unknown diagram format 'jpg': valid formats are mermaid, dot, svg"
    ):
        render("jpg")


def fake_dot(directory: Path, body: str) -> None:
    script = directory / "dot"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)


def test_a_graphviz_failure_is_a_diagram_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_dot(tmp_path, "echo 'Error: <stdin>: syntax error in line 3' >&2; exit 1")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(
        DiagramError, match=r"`dot -Tsvg` failed \(1\): Error: <stdin>: syntax error in line 3"
    ):
        render("svg")


def test_a_wedged_graphviz_is_cut_off(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_dot(tmp_path, f"exec {shutil.which('sleep')} 60")  # PATH will not find it
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(diagram, "GRAPHVIZ_TIMEOUT_SECONDS", 0.2)
    with pytest.raises(DiagramError, match=r"`dot -Tpng` took over 0.2s"):
        render("png")
