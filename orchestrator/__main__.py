"""``python -m orchestrator``: the operator CLI."""

from orchestrator.cli import cli

cli()
