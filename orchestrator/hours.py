"""Opening hours: when a call flow counts as open, in the wall-clock time of one place.

A schedule is written in the call flow YAML (``hours: {name: ...}``) and validated at
start-up, so a typo in a day, a time or a zone stops start-up with one line naming it
instead of silently routing callers to a closed queue.

Times are local wall-clock readings: ``09:00-17:00`` means what a clock in the office
shows, on both sides of a daylight-saving change. Consequences at a change:

* the skipped hour (clocks jump forward) is never seen, so a range inside it never
  opens that day, and a range across it is an hour shorter in real time;
* in the repeated hour (clocks go back) each reading occurs twice and is judged the same
  both times, so a range across it is an hour longer, and a range that starts or ends
  inside it opens (or closes) twice.

An overnight range (``22:00-02:00``) follows the clock the same way: it ends when the
clock shows 02:00, however long that took.
"""

from __future__ import annotations

import datetime as dt
import difflib
import re
from collections.abc import Mapping
from functools import cache, cached_property
from itertools import pairwise
from typing import Any, NamedTuple, Self
from zoneinfo import ZoneInfo, available_timezones

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # index = datetime.weekday()
_DAY_INDEX = {day: i for i, day in enumerate(DAYS)}
_DAY_KEY = re.compile(r"^\s*([a-z]+)\s*(?:-\s*([a-z]+)\s*)?$", re.IGNORECASE)
_CLOCK = r"(\d{2}):(\d{2})"
_TIME = re.compile(rf"^\s*{_CLOCK}\s*$")
_RANGE = re.compile(rf"^\s*{_CLOCK}\s*-\s*{_CLOCK}\s*$")
_MIDNIGHT = 24 * 60  # minutes in a day; "24:00" as an end


class _Strict(BaseModel):
    # Its own base, not callflow's: callflow imports this module.
    model_config = ConfigDict(extra="forbid", frozen=True)


@cache
def _zone_names() -> frozenset[str]:
    # Membership, not just ZoneInfo(name): a case-insensitive file system (macOS) would
    # load "america/new_york", and a flow must not load on one machine and fail on another.
    return frozenset(available_timezones())


def _minutes(hours: str, minutes: str) -> int:
    return int(hours) * 60 + int(minutes)


def _hhmm(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


def _parse_days(key: str) -> tuple[int, ...]:
    """``mon`` -> (0,); ``mon-fri`` -> (0..4); ``fri-mon`` wraps: (4, 5, 6, 0)."""
    match = _DAY_KEY.match(key)
    names = [n.lower() for n in match.groups() if n is not None] if match else []
    if not names or any(n not in _DAY_INDEX for n in names):
        raise ValueError(f"{key!r} is not a day or day range (mon, tue, ... sun, or like mon-fri)")
    first, last = _DAY_INDEX[names[0]], _DAY_INDEX[names[-1]]
    if len(names) == 2 and first == last:
        raise ValueError(f"{key!r} starts and ends on the same day: write {names[0]!r}")
    return tuple((first + i) % 7 for i in range((last - first) % 7 + 1))


def _parse_range(text: str) -> tuple[int, int]:
    """Start and end minute of ``HH:MM-HH:MM``; an end before the start is on the next day."""
    match = _RANGE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not HH:MM-HH:MM")
    start, end = _minutes(*match.group(1, 2)), _minutes(*match.group(3, 4))
    for hours, minutes in (match.group(1, 2), match.group(3, 4)):
        if int(minutes) > 59 or int(hours) > 24 or (int(hours) == 24 and int(minutes) != 0):
            raise ValueError(f"{text!r} is not HH:MM-HH:MM ({hours}:{minutes} is not a time of day)")
    if start == _MIDNIGHT:
        raise ValueError(f"{text!r} starts at 24:00: write 00:00 (a range starting at midnight)")
    if start == end:
        raise ValueError(f"{text!r} starts and ends at the same time (the whole day is 00:00-24:00)")
    return start, end


def _parse_time(value: str) -> int:
    match = _TIME.match(value)
    if not match or int(match[1]) > 23 or int(match[2]) > 59:
        raise ValueError(f"{value!r} is not HH:MM (00:00 to 23:59)")
    return _minutes(match[1], match[2])


class Closure(_Strict):
    """A local date the schedule is closed: all day, or from a time to its end (early close).

    YAML may give just the date (``- 2026-12-25``) or ``{date: ..., from: "13:00"}``.
    """

    date: dt.date
    from_: str | None = Field(default=None, alias="from")

    @model_validator(mode="before")
    @classmethod
    def _bare_date(cls, data: Any) -> Any:
        return data if isinstance(data, (Mapping, cls)) else {"date": data}

    @field_validator("date", mode="before")
    @classmethod
    def _date(cls, value: Any) -> dt.date:
        # Stricter than pydantic's date: it would take a timestamp number or a date and time.
        if isinstance(value, dt.datetime):
            raise ValueError(f"{value} has a time of day: give only the date (YYYY-MM-DD)")
        if isinstance(value, dt.date):
            return value
        if isinstance(value, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", value.strip()):
            try:
                return dt.date.fromisoformat(value.strip())
            except ValueError:
                pass
        raise ValueError(f"{value!r} is not a date (YYYY-MM-DD)")

    @field_validator("from_", mode="before")
    @classmethod
    def _from(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            # YAML 1.1 reads unquoted 13:00 as the base-60 number 780.
            raise ValueError(
                f"YAML read an unquoted {value // 60}:{value % 60:02d} as the number {value}: "
                f'quote the time, like from: "{value // 60:02d}:{value % 60:02d}"'
            )
        if isinstance(value, str):
            _parse_time(value)
        return value

    @property
    def closed_from(self) -> int:
        """The minute of the day the closure starts (0: the whole day)."""
        return 0 if self.from_ is None else _parse_time(self.from_)


class _Schedule(NamedTuple):
    """What ``is_open`` reads: everything parsed once."""

    zone: ZoneInfo
    days: tuple[tuple[tuple[int, int], ...], ...]  # weekday -> (start, end) minutes, end exclusive
    closed_from: dict[dt.date, int]  # local date -> minute of the day it closes from


class _Span(NamedTuple):
    start: int
    end: int
    key: str  # the weekly key and range it came from, for errors
    text: str


def _week(weekly: Mapping[str, list[str]]) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Per weekday, the minutes open; overnight ranges split at midnight. Errors name the key."""
    listed: dict[int, str] = {}
    spans: list[list[_Span]] = [[] for _ in DAYS]
    for key, ranges in weekly.items():
        try:
            days = _parse_days(key)
        except ValueError as e:
            raise ValueError(f"weekly.{key}: {e}") from None
        for day in days:
            if day in listed:
                raise ValueError(f"weekly.{key}: {DAYS[day]} is already listed in {listed[day]!r}")
            listed[day] = key
        for text in ranges:
            try:
                start, end = _parse_range(text)
            except ValueError as e:
                raise ValueError(f"weekly.{key}: {e}") from None
            for day in days:
                if start < end:
                    spans[day].append(_Span(start, end, key, text))
                else:  # past midnight: the rest of this day, then the next day's start
                    spans[day].append(_Span(start, _MIDNIGHT, key, text))
                    if end:
                        spans[(day + 1) % 7].append(_Span(0, end, key, text))
    for day, day_spans in enumerate(spans):
        day_spans.sort()
        for earlier, later in pairwise(day_spans):
            if later.start < earlier.end:
                of = "" if earlier.key == later.key else f" of {earlier.key!r}"
                raise ValueError(
                    f"weekly.{later.key}: {later.text!r} overlaps {earlier.text!r}{of} on {DAYS[day]}"
                )
    return tuple(tuple((s.start, s.end) for s in day_spans) for day_spans in spans)


class Hours(_Strict):
    """One opening-hours schedule: weekly local ranges, minus closures.

    Days not in ``weekly`` are closed; an empty ``weekly`` is a schedule that is never open
    (allowed: a line that is only ever closed, e.g. while being set up).
    """

    time_zone: str
    weekly: dict[str, list[str]] = Field(default_factory=dict)
    closures: list[Closure] = Field(default_factory=list)

    @field_validator("time_zone")
    @classmethod
    def _known_zone(cls, name: str) -> str:
        if name not in _zone_names():
            near = difflib.get_close_matches(name, _zone_names(), n=1)
            hint = f"did you mean {near[0]!r}?" if near else "like America/New_York or Europe/London"
            raise ValueError(f"{name!r} is not an IANA time zone name ({hint})")
        return name

    @model_validator(mode="after")
    def _parse(self) -> Self:
        # Parsed here, once, so errors stop loading and is_open reads the cached result.
        _ = self._schedule
        return self

    @cached_property
    def _schedule(self) -> _Schedule:
        closed_from: dict[dt.date, int] = {}
        for i, closure in enumerate(self.closures):
            if closure.date in closed_from:
                raise ValueError(f"closures.{i}: {closure.date} is listed twice")
            closed_from[closure.date] = closure.closed_from
        return _Schedule(ZoneInfo(self.time_zone), _week(self.weekly), closed_from)

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy without the parsed cache: pydantic copies ``__dict__``, where it lives."""
        copied = super().model_copy(update=update, deep=deep)
        copied.__dict__.pop("_schedule", None)
        return copied

    def is_open(self, moment: dt.datetime) -> bool:
        """Whether the schedule is open at ``moment`` (timezone-aware), read on the local clock."""
        if moment.tzinfo is None or moment.utcoffset() is None:
            raise ValueError(f"{moment.isoformat()} has no time zone: pass an aware datetime")
        schedule = self._schedule
        local = moment.astimezone(schedule.zone)
        minute = local.hour * 60 + local.minute
        closed_from = schedule.closed_from.get(local.date())
        if closed_from is not None and minute >= closed_from:
            return False
        return any(start <= minute < end for start, end in schedule.days[local.weekday()])

    def describe(self) -> str:
        """One line for diagrams and docs, e.g. ``Europe/London: mon-fri 09:00-17:00; closed 2026-12-25``."""
        by_first_day = sorted(self.weekly.items(), key=lambda item: _parse_days(item[0])[0])
        week = "; ".join(
            f"{key.strip().lower()} {', '.join(r.strip() for r in ranges) or 'closed'}"
            for key, ranges in by_first_day
        )
        parts = [week or "closed every day"]
        if self.closures:
            closed = (
                f"{c.date}" if c.from_ is None else f"{c.date} from {_hhmm(c.closed_from)}"
                for c in self.closures
            )
            parts.append(f"closed {', '.join(closed)}")
        return f"{self.time_zone}: {'; '.join(parts)}"
