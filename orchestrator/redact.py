"""Redaction of what callers say, before it becomes part of a call.

Applied once, where caller words (and the agent side's status messages) enter a turn, so
the transcript, the history, the shard feeds, the outbox, the logs, the operator API,
the CLI and the dashboard only ever hold the redacted text. Built once per call flow
(``privacy:`` in the flow file); see docs/privacy.md.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

MASK = "*"  # a long digit run becomes one per digit, but the last few: ************1111
CALLER_NUMBER = "[caller number]"  # what the caller's own number becomes
# The caller's number is recognised from this many digits on: the subscriber part of most
# national numbers ("555 0123"); shorter runs (a menu choice, a PIN's worth) stay.
CALLER_MIN_DIGITS = 7
# Between two digits of one run: up to three of these, as people speak and type numbers
# ("4111 1111 1111 1111", "+1 (425) 555-0100", "425.555.0100", 4111 1111 1111 1111 with en dashes):
# any whitespace (no-break and narrow spaces too), invisible format characters (soft hyphen,
# zero-width space and joiners, word joiner, BOM), dots, commas, slashes, brackets and every
# dash and hyphen (U+2010-U+2015, minus, the small and fullwidth hyphen-minus). A date or an
# amount of 7 or more digits ("2024/01/15", "1,250,000") is masked too: a false positive
# rather than a card number left readable. No class member is a digit, so the scan stays
# linear: each repetition of the run takes a digit.
_SEPARATORS = r"[\s\u00ad\u200b-\u200d\u2060\ufeff.,/()\-\u2010-\u2015\u2212\ufe63\uff0d]{0,3}"
_NON_DIGITS = re.compile(r"\D")
# How far past a cut redaction looks. Text that is kept only up to a limit is cut at the
# limit plus this, redacted, then cut at the limit: a match of a rule that starts before
# the limit is found whole if it is at most this long, and no rule scans more than needed.
MARGIN = 256


def masked(digits: str, keep: int = 4) -> str:
    """``digits`` as shown: a ``*`` for each but the last ``keep`` (``************1111``)."""
    return MASK * (len(digits) - keep) + digits[len(digits) - keep :]


def _digits(text: str) -> str:
    """The digits of ``text``, leading zeros (a trunk or international prefix) dropped."""
    return _NON_DIGITS.sub("", text).lstrip("0")


class Redactor:
    """Replaces digit runs, the caller's own number and configured patterns in text.

    ``digit_runs``: runs of at least this many digits are masked, a ``*`` per digit but
    the last ``keep_last`` (separators dropped: ``************1111``; 0: off);
    ``caller_number``: the caller's number (``from.id``), in any formatting (with or
    without ``+``, country code, trunk ``0``, separators), becomes ``[caller number]``;
    ``patterns``: (compiled regex, replacement) applied in order after both.
    Every regex is compiled once; text without a match costs one scan per regex.
    """

    __slots__ = ("_caller_number", "_digit_runs", "_keep_last", "_patterns", "_runs")

    def __init__(
        self,
        *,
        digit_runs: int = 7,
        keep_last: int = 4,
        caller_number: bool = True,
        patterns: Sequence[tuple[re.Pattern[str], str]] = (),
    ) -> None:
        self._digit_runs = digit_runs
        self._keep_last = keep_last
        self._caller_number = caller_number
        # ``replace_with`` is literal text: as a template, "C:\\path" would raise re.error
        # on every turn and "\\1" would put the caller's words back.
        self._patterns = tuple((pattern, _literal(replacement)) for pattern, replacement in patterns)
        shortest = min(
            [n for n in (digit_runs, CALLER_MIN_DIGITS if caller_number else 0) if n > 0], default=0
        )
        # One scan finds every candidate run: digits with separators between them, with the
        # "+" or "(" a number may start with. Each repetition takes a digit, and digits are
        # no separators: the scan is linear, whatever the text.
        self._runs = re.compile(rf"\+?\(?\d(?:{_SEPARATORS}\d){{{shortest - 1},}}") if shortest else None

    @property
    def has_patterns(self) -> bool:
        """Whether configured patterns (which may cost more than linear time) apply."""
        return bool(self._patterns)

    def __call__(self, text: str, caller: str = "") -> str:
        """``text`` redacted; ``caller`` is the caller's id (``from.id``, a phone number)."""
        runs = self._runs
        if runs is not None and runs.search(text) is not None:
            caller_digits = _digits(caller) if self._caller_number else ""
            if len(caller_digits) < CALLER_MIN_DIGITS:
                caller_digits = ""  # not a phone number (a test or Web Chat user id)
            digit_runs, keep = self._digit_runs, self._keep_last

            def replace(match: re.Match[str]) -> str:
                digits = _digits(match.group())
                if caller_digits and len(digits) >= CALLER_MIN_DIGITS and caller_digits.endswith(digits):
                    return CALLER_NUMBER
                every = _NON_DIGITS.sub("", match.group())
                if digit_runs and len(every) >= digit_runs:
                    return masked(every, keep)
                return match.group()

            text = runs.sub(replace, text)
        for pattern, replacement in self._patterns:
            text = pattern.sub(replacement, text)  # a function: its text is taken literally
        return text


def _literal(replacement: str) -> Callable[[re.Match[str]], str]:
    return lambda _match: replacement


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """``pattern`` compiled; ValueError (saying why) if it is not a usable redaction rule."""
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{pattern!r} is not a valid regular expression: {e}") from e
    if compiled.fullmatch(""):
        raise ValueError(f"{pattern!r} matches the empty string: it would redact between every character")
    return compiled
