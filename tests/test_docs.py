"""Docs generated from code stay in step with it."""

from __future__ import annotations

from states.diagram import DOC, mermaid


def test_the_state_diagram_in_the_docs_matches_the_machine() -> None:
    assert mermaid() in DOC.read_text(encoding="utf-8"), (
        "docs/state-machine.md is out of date: run `python -m states.diagram`"
    )


def test_the_diagram_has_every_transition() -> None:
    diagram = mermaid()
    for arrow in ["bot --> transferring", "failed --> bot", "accepted --> bot", "transferring --> ended"]:
        assert arrow in diagram


def test_the_readme_call_flow_example_loads() -> None:
    """The README's annotated flow file is a valid flow, every node reachable."""
    from pathlib import Path

    from orchestrator.callflow import parse_callflow

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    start = readme.index("```yaml\nvoice: ") + len("```yaml\n")
    flow = parse_callflow(readme[start : readme.index("```", start)], "README.md")
    assert set(flow.reachable()) == set(flow.nodes)
