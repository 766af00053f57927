"""The few errors the product raises, each carrying what a user needs to act."""

from __future__ import annotations


class ConfigError(Exception):
    """A setting or the call flow file is wrong; start-up stops with this one line."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


class StoreUnavailable(Exception):
    """Redis cannot be reached or did not answer in time; the turn is not applied."""


class CommitConflict(Exception):
    """A call changed under us more often than the retry budget allows."""

    def __init__(self, conversation_id: str, attempts: int) -> None:
        super().__init__(f"call {conversation_id!r}: {attempts} concurrent commits lost in a row")
        self.conversation_id = conversation_id
        self.attempts = attempts


def describe_validation(error: dict[str, object]) -> tuple[str, str]:
    """(field path, problem) of one pydantic error, worded for a person."""
    loc = error.get("loc") or ()
    where = ".".join(str(part) for part in loc)  # type: ignore[attr-defined]
    kind = error.get("type")
    if kind == "extra_forbidden":
        return where, "unknown field (check its spelling against the README)"
    problem = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    if kind not in ("missing", "value_error") and "input" in error:
        problem += f" (got {error['input']!r})"
    return where, problem
