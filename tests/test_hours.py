"""Opening hours: local wall-clock ranges across DST changes, closures, and load errors
that name the field.

Every moment is passed in (mostly as UTC, so the local reading is the code's job, not
the test's); nothing reads the real clock.
"""

from __future__ import annotations

import datetime as dt
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from orchestrator.errors import describe_validation
from orchestrator.hours import DAYS, Closure, Hours

UTC = dt.UTC
NY = "America/New_York"
LONDON = "Europe/London"

EXAMPLE = """
hours:
  office:
    time_zone: America/New_York
    weekly:
      mon-fri: ["08:00-12:00", "13:00-18:00"]
      sat: ["09:00-13:00"]
    closures:
      - 2026-12-25
      - {date: 2026-12-31, from: "13:00"}
"""


def hours(time_zone: str = NY, closures: list[Any] | None = None, **weekly: list[str]) -> Hours:
    """A schedule; day keys as keyword arguments (``mon_fri`` for ``mon-fri``)."""
    doc: dict[str, Any] = {
        "time_zone": time_zone,
        "weekly": {k.replace("_", "-"): v for k, v in weekly.items()},
    }
    if closures is not None:
        doc["closures"] = closures
    return Hours.model_validate(doc)


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> dt.datetime:
    return dt.datetime(year, month, day, hour, minute, tzinfo=UTC)


def local(
    zone: str, year: int, month: int, day: int, hour: int, minute: int, second: int = 0, *, fold: int = 0
) -> dt.datetime:
    """A local wall-clock reading; ``fold=1`` is the second pass of a repeated hour."""
    return dt.datetime(year, month, day, hour, minute, second, tzinfo=ZoneInfo(zone), fold=fold)


def error(doc: dict[str, Any]) -> str:
    """The one line a user reads (as the call flow loader words it)."""
    with pytest.raises(ValidationError) as info:
        Hours.model_validate(doc)
    where, problem = describe_validation(dict(info.value.errors()[0]))
    return f"{where}: {problem}" if where else problem


def open_minutes(schedule: Hours, start: dt.datetime, end: dt.datetime) -> int:
    """How many real minutes in [start, end) the schedule is open, minute by minute."""
    count, moment = 0, start.astimezone(UTC)
    while moment < end:
        count += schedule.is_open(moment)
        moment += dt.timedelta(minutes=1)
    return count


# --- loading and describing --------------------------------------------------------------


def test_the_documented_yaml_loads() -> None:
    office = Hours.model_validate(yaml.safe_load(EXAMPLE)["hours"]["office"])
    assert office.time_zone == NY
    assert office.weekly == {"mon-fri": ["08:00-12:00", "13:00-18:00"], "sat": ["09:00-13:00"]}
    assert office.closures == [
        Closure(date=dt.date(2026, 12, 25)),
        Closure.model_validate({"date": "2026-12-31", "from": "13:00"}),
    ]
    assert office.closures[1].from_ == "13:00"
    assert office.describe() == (
        "America/New_York: mon-fri 08:00-12:00, 13:00-18:00; sat 09:00-13:00; "
        "closed 2026-12-25, 2026-12-31 from 13:00"
    )


def test_describe_orders_by_first_day_and_says_when_never_open() -> None:
    assert hours(sun=[], sat=["09:00-13:00"]).describe() == "America/New_York: sat 09:00-13:00; sun closed"
    assert hours(LONDON, sun=["10:00-16:00"], mon_fri=["09:00-17:00"]).describe() == (
        "Europe/London: mon-fri 09:00-17:00; sun 10:00-16:00"
    )
    assert Hours(time_zone="UTC").describe() == "UTC: closed every day"


def test_closure_dates_may_be_strings_and_parsed_once_at_load() -> None:
    schedule = hours(
        closures=["2026-12-25", {"date": "2026-12-31", "from": "13:00"}], mon_fri=["08:00-18:00"]
    )
    assert [c.date for c in schedule.closures] == [dt.date(2026, 12, 25), dt.date(2026, 12, 31)]
    assert "_schedule" in schedule.__dict__  # built by validation, not by the first is_open


def test_frozen_equal_and_copy_drops_the_cache() -> None:
    a, b = hours(mon=["09:00-17:00"]), hours(mon=["09:00-17:00"])
    assert a == b == a.model_copy()  # the cache is not compared
    assert a != hours(mon=["09:00-17:30"])
    with pytest.raises(ValidationError):
        a.time_zone = LONDON
    moved = a.model_copy(update={"time_zone": LONDON})
    monday_9_london = utc(2026, 1, 5, 9)  # 04:00 in New York
    assert not a.is_open(monday_9_london)
    assert moved.is_open(monday_9_london)


# --- the weekly ranges -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("moment", "is_open"),
    [
        (local(NY, 2026, 1, 5, 7, 59, 59), False),  # a monday
        (local(NY, 2026, 1, 5, 8, 0), True),
        (local(NY, 2026, 1, 5, 11, 59, 59), True),
        (local(NY, 2026, 1, 5, 12, 0), False),  # lunch
        (local(NY, 2026, 1, 5, 13, 0), True),
        (local(NY, 2026, 1, 9, 17, 59), True),  # friday
        (local(NY, 2026, 1, 9, 18, 0), False),
        (local(NY, 2026, 1, 10, 9, 0), True),  # saturday
        (local(NY, 2026, 1, 10, 13, 0), False),
        (local(NY, 2026, 1, 11, 12, 0), False),  # sunday: not listed
    ],
)
def test_weekly_ranges_are_start_inclusive_end_exclusive(moment: dt.datetime, is_open: bool) -> None:
    office = Hours.model_validate(yaml.safe_load(EXAMPLE)["hours"]["office"])
    assert office.is_open(moment) is is_open
    assert office.is_open(moment.astimezone(UTC)) is is_open  # the same instant, said in UTC
    assert office.is_open(moment.astimezone(ZoneInfo("Asia/Tokyo"))) is is_open


def test_any_aware_zone_is_read_in_the_schedule_zone() -> None:
    office = hours(mon=["09:00-17:00"])
    plus_two = dt.timezone(dt.timedelta(hours=2))
    assert office.is_open(dt.datetime(2026, 1, 5, 16, 0, tzinfo=plus_two))  # 09:00 in New York
    assert not office.is_open(dt.datetime(2026, 1, 5, 15, 59, tzinfo=plus_two))


def test_a_naive_moment_is_refused() -> None:
    with pytest.raises(ValueError, match=r"2026-01-05T09:00:00 has no time zone"):
        hours(mon=["09:00-17:00"]).is_open(dt.datetime(2026, 1, 5, 9, 0))


def test_whole_day_and_unlisted_days() -> None:
    schedule = hours(wed=["00:00-24:00"], thu=[])
    assert schedule.is_open(local(NY, 2026, 1, 7, 0, 0))
    assert schedule.is_open(local(NY, 2026, 1, 7, 23, 59, 59))
    assert not schedule.is_open(local(NY, 2026, 1, 8, 0, 0))  # thu: listed, no ranges
    assert not schedule.is_open(local(NY, 2026, 1, 6, 23, 59))
    assert Hours(time_zone=NY).is_open(local(NY, 2026, 1, 7, 12, 0)) is False  # empty weekly


def test_overnight_range_runs_into_the_next_day() -> None:
    schedule = hours(fri=["22:00-02:00"], sun=["23:00-01:00"])
    assert not schedule.is_open(local(NY, 2026, 1, 9, 21, 59))
    assert schedule.is_open(local(NY, 2026, 1, 9, 22, 0))
    assert schedule.is_open(local(NY, 2026, 1, 10, 1, 59))  # saturday, from friday's range
    assert not schedule.is_open(local(NY, 2026, 1, 10, 2, 0))
    assert not schedule.is_open(local(NY, 2026, 1, 10, 22, 0))  # saturday's own night: closed
    assert schedule.is_open(local(NY, 2026, 1, 12, 0, 30))  # sunday's night wraps into monday
    assert not schedule.is_open(local(NY, 2026, 1, 12, 1, 0))


def test_overnight_to_midnight_is_the_rest_of_the_day() -> None:
    schedule = hours(mon=["22:00-00:00"])
    assert schedule.is_open(local(NY, 2026, 1, 5, 23, 59))
    assert not schedule.is_open(local(NY, 2026, 1, 6, 0, 0))


@pytest.mark.parametrize(
    ("key", "open_days"),
    [
        ("fri-mon", {"fri", "sat", "sun", "mon"}),
        ("sun-tue", {"sun", "mon", "tue"}),
        ("mon-sun", set(DAYS)),
        ("sat-fri", set(DAYS)),
        ("Mon-FRI", {"mon", "tue", "wed", "thu", "fri"}),
        (" Wed ", {"wed"}),
    ],
)
def test_day_ranges_wrap_and_ignore_case(key: str, open_days: set[str]) -> None:
    schedule = Hours.model_validate({"time_zone": NY, "weekly": {key: ["10:00-11:00"]}})
    monday = dt.date(2026, 1, 5)
    for offset, day in enumerate(DAYS):
        moment = dt.datetime.combine(monday + dt.timedelta(days=offset), dt.time(10, 30), ZoneInfo(NY))
        assert schedule.is_open(moment) is (day in open_days), day


# --- closures ----------------------------------------------------------------------------


def test_a_closure_closes_the_whole_local_date() -> None:
    office = Hours.model_validate(yaml.safe_load(EXAMPLE)["hours"]["office"])
    assert not office.is_open(local(NY, 2026, 12, 25, 10, 0))  # a friday
    assert office.is_open(local(NY, 2026, 12, 18, 10, 0))  # the friday before
    assert office.is_open(local(NY, 2026, 12, 26, 10, 0))  # the saturday after


def test_an_early_close_closes_from_its_time() -> None:
    office = Hours.model_validate(yaml.safe_load(EXAMPLE)["hours"]["office"])
    assert office.is_open(local(NY, 2026, 12, 31, 11, 59))
    assert not office.is_open(local(NY, 2026, 12, 31, 12, 30))  # lunch, as every day
    assert not office.is_open(local(NY, 2026, 12, 31, 13, 0))  # would be open but for the closure
    assert not office.is_open(local(NY, 2026, 12, 31, 17, 0))


def test_a_closure_is_read_on_the_local_date_not_utc() -> None:
    schedule = hours(mon_sun=["00:00-24:00"], closures=["2026-12-31"])  # New York is UTC-5 in December
    assert schedule.is_open(utc(2026, 12, 31, 4, 59))  # 23:59 on the 30th, though the 31st in UTC
    assert not schedule.is_open(utc(2026, 12, 31, 5, 0))  # 00:00 on the 31st
    assert not schedule.is_open(utc(2027, 1, 1, 4, 59))  # 23:59 on the 31st, though 1 January in UTC
    assert schedule.is_open(utc(2027, 1, 1, 5, 0))


def test_a_closure_cuts_the_tail_of_the_previous_nights_range_only() -> None:
    """The closure is the local date: the 24th's night shift stops at midnight on the 25th,
    and the 25th's night shift is closed until midnight but its tail on the 26th opens."""
    schedule = hours(mon_sun=["22:00-02:00"], closures=["2026-12-25"])
    assert schedule.is_open(local(NY, 2026, 12, 24, 23, 59))
    assert not schedule.is_open(local(NY, 2026, 12, 25, 0, 0))
    assert not schedule.is_open(local(NY, 2026, 12, 25, 1, 0))
    assert not schedule.is_open(local(NY, 2026, 12, 25, 22, 0))
    assert schedule.is_open(local(NY, 2026, 12, 26, 0, 0))
    assert schedule.is_open(local(NY, 2026, 12, 26, 22, 0))


def test_an_early_close_from_midnight_is_the_whole_day() -> None:
    schedule = hours(mon_sun=["00:00-24:00"], closures=[{"date": "2026-12-25", "from": "00:00"}])
    assert not schedule.is_open(local(NY, 2026, 12, 25, 0, 0))
    assert schedule.is_open(local(NY, 2026, 12, 24, 23, 59))


# --- daylight saving ---------------------------------------------------------------------
# New York: clocks jump 02:00 -> 03:00 on 2026-03-08 (UTC-5 -> UTC-4) and go back
# 02:00 -> 01:00 on 2026-11-01. London: 01:00 -> 02:00 on 2026-03-29 (UTC+0 -> UTC+1) and
# 02:00 -> 01:00 on 2026-10-25. All four are Sundays; the Monday after is checked.


@pytest.mark.parametrize(
    ("zone", "before", "after"),
    [
        # (zone, UTC of 09:00 local on the friday before, UTC of 09:00 local on the monday after)
        (NY, utc(2026, 3, 6, 14), utc(2026, 3, 9, 13)),
        (NY, utc(2026, 10, 30, 13), utc(2026, 11, 2, 14)),
        (LONDON, utc(2026, 3, 27, 9), utc(2026, 3, 30, 8)),
        (LONDON, utc(2026, 10, 23, 8), utc(2026, 10, 26, 9)),
    ],
)
def test_nine_to_five_is_local_on_both_sides_of_a_change(
    zone: str, before: dt.datetime, after: dt.datetime
) -> None:
    schedule = hours(zone, mon_fri=["09:00-17:00"])
    minute, eight_hours = dt.timedelta(minutes=1), dt.timedelta(hours=8)
    for nine in (before, after):
        assert not schedule.is_open(nine - minute)  # 08:59 local
        assert schedule.is_open(nine)  # 09:00 local
        assert schedule.is_open(nine + eight_hours - minute)  # 16:59 local
        assert not schedule.is_open(nine + eight_hours)  # 17:00 local
    # The same UTC time of day is 08:00 local (closed) on one side and 10:00 (open) on the other.
    three_days = dt.timedelta(days=3)
    assert {schedule.is_open(after - three_days), schedule.is_open(before + three_days)} == {True, False}


@pytest.mark.parametrize(
    ("zone", "saturday", "real_minutes"),
    [
        (NY, dt.date(2026, 3, 7), 5 * 60),  # the skipped hour is not worked
        (NY, dt.date(2026, 10, 31), 7 * 60),  # the repeated hour is worked twice
        (LONDON, dt.date(2026, 3, 28), 5 * 60),
        (LONDON, dt.date(2026, 10, 24), 7 * 60),
    ],
)
def test_an_overnight_range_across_a_change_follows_the_clock(
    zone: str, saturday: dt.date, real_minutes: int
) -> None:
    """22:00-04:00 is six hours on the clock: five or seven real hours on a change night."""
    schedule = hours(zone, sat=["22:00-04:00"])
    start = dt.datetime.combine(saturday, dt.time(20), ZoneInfo(zone))
    assert open_minutes(schedule, start, start + dt.timedelta(hours=12)) == real_minutes
    sunday = saturday + dt.timedelta(days=1)
    assert schedule.is_open(dt.datetime.combine(sunday, dt.time(3, 59), ZoneInfo(zone)))
    assert not schedule.is_open(dt.datetime.combine(sunday, dt.time(4, 0), ZoneInfo(zone)))


def test_a_range_inside_the_skipped_hour_never_opens_that_day() -> None:
    schedule = hours(NY, sun=["02:00-02:30"])
    change_day = local(NY, 2026, 3, 8, 0, 0)
    assert open_minutes(schedule, change_day, change_day + dt.timedelta(days=1)) == 0
    next_sunday = local(NY, 2026, 3, 15, 0, 0)
    assert open_minutes(schedule, next_sunday, next_sunday + dt.timedelta(days=1)) == 30


def test_a_range_across_the_skipped_hour_is_an_hour_shorter() -> None:
    schedule = hours(NY, sun=["01:00-04:00"])
    assert not schedule.is_open(utc(2026, 3, 8, 5, 59))  # 00:59 EST
    assert schedule.is_open(utc(2026, 3, 8, 6, 59))  # 01:59 EST; the next minute is 03:00 EDT
    assert schedule.is_open(utc(2026, 3, 8, 7, 0))  # 03:00 EDT
    assert not schedule.is_open(utc(2026, 3, 8, 8, 0))  # 04:00 EDT
    day = local(NY, 2026, 3, 8, 0, 0)
    assert open_minutes(schedule, day, day + dt.timedelta(days=1)) == 2 * 60


def test_an_end_inside_the_repeated_hour_closes_twice() -> None:
    """Chosen: a wall-clock reading is judged the same both times it occurs. 00:00-01:30 is
    open until the first 01:30, then again from the second 01:00 to the second 01:30."""
    schedule = hours(NY, sun=["00:00-01:30"])
    assert schedule.is_open(local(NY, 2026, 11, 1, 1, 29))  # 05:29 UTC, EDT
    assert not schedule.is_open(local(NY, 2026, 11, 1, 1, 30))  # 05:30 UTC, EDT
    assert schedule.is_open(local(NY, 2026, 11, 1, 1, 0, fold=1))  # 06:00 UTC, EST
    assert schedule.is_open(utc(2026, 11, 1, 6, 29))
    assert not schedule.is_open(utc(2026, 11, 1, 6, 30))  # the second 01:30
    day = local(NY, 2026, 11, 1, 0, 0)
    assert open_minutes(schedule, day, day + dt.timedelta(days=1)) == 90 + 30


@pytest.mark.parametrize(("date", "real_hours"), [(dt.date(2026, 3, 29), 23), (dt.date(2026, 10, 25), 25)])
def test_a_whole_change_day_is_its_real_length_and_a_closure_closes_all_of_it(
    date: dt.date, real_hours: int
) -> None:
    start = dt.datetime.combine(date, dt.time(0), ZoneInfo(LONDON))
    end = dt.datetime.combine(date + dt.timedelta(days=1), dt.time(0), ZoneInfo(LONDON))
    hour = dt.timedelta(hours=1)
    assert (end - start) / hour == 24  # aware arithmetic within one zone is wall-clock time...
    assert (end.astimezone(UTC) - start.astimezone(UTC)) / hour == real_hours  # ...across UTC, real time
    assert open_minutes(hours(LONDON, sun=["00:00-24:00"]), start, end) == real_hours * 60
    closed = hours(LONDON, sun=["00:00-24:00"], closures=[date.isoformat()])
    assert open_minutes(closed, start - dt.timedelta(hours=2), end + dt.timedelta(hours=2)) == 0


# --- errors at load ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weekly", "message"),
    [
        ({"mon-fry": []}, "weekly.mon-fry: 'mon-fry' is not a day or day range"),
        ({"funday": []}, "weekly.funday: 'funday' is not a day or day range"),
        ({"mon-tue-wed": []}, "weekly.mon-tue-wed: 'mon-tue-wed' is not a day or day range"),
        ({"mon-mon": []}, "weekly.mon-mon: 'mon-mon' starts and ends on the same day: write 'mon'"),
        ({"mon-fri": [], "wed": []}, "weekly.wed: wed is already listed in 'mon-fri'"),
        ({"Mon": [], "mon": []}, "weekly.mon: mon is already listed in 'Mon'"),
        ({"fri-mon": [], "mon-tue": []}, "weekly.mon-tue: mon is already listed in 'fri-mon'"),
        ({"mon-fri": ["25:00-26:00"]}, "weekly.mon-fri: '25:00-26:00' is not HH:MM-HH:MM"),
        ({"mon": ["8-12"]}, "weekly.mon: '8-12' is not HH:MM-HH:MM"),
        ({"mon": ["8:00-12:00"]}, "weekly.mon: '8:00-12:00' is not HH:MM-HH:MM"),
        ({"mon": ["08:00"]}, "weekly.mon: '08:00' is not HH:MM-HH:MM"),
        ({"mon": ["08:00-12:00-13:00"]}, "weekly.mon: '08:00-12:00-13:00' is not HH:MM-HH:MM"),
        ({"mon": ["08:60-09:00"]}, "weekly.mon: '08:60-09:00' is not HH:MM-HH:MM (08:60 is not a time"),
        ({"mon": ["08:00-24:30"]}, "weekly.mon: '08:00-24:30' is not HH:MM-HH:MM (24:30 is not a time"),
        ({"mon": ["24:00-02:00"]}, "weekly.mon: '24:00-02:00' starts at 24:00: write 00:00"),
        ({"mon": ["09:00-09:00"]}, "weekly.mon: '09:00-09:00' starts and ends at the same time"),
        (
            {"mon": ["00:00-00:00"]},
            "weekly.mon: '00:00-00:00' starts and ends at the same time (the whole day is 00:00-24:00)",
        ),
        ({"mon": ["08:00-12:00", "11:00-13:00"]}, "weekly.mon: '11:00-13:00' overlaps '08:00-12:00' on mon"),
        ({"mon": ["20:00-23:00", "22:00-02:00"]}, "weekly.mon: '22:00-02:00' overlaps '20:00-23:00' on mon"),
        (
            {"fri": ["22:00-02:00"], "sat": ["01:00-05:00"]},
            "'01:00-05:00' overlaps '22:00-02:00' of 'fri' on sat",
        ),
        (
            {"mon-tue": ["10:00-12:00", "23:00-11:00"]},
            "weekly.mon-tue: '10:00-12:00' overlaps '23:00-11:00' on tue",
        ),
        (
            {"sun": ["23:00-09:00"], "mon": ["08:00-17:00"]},
            "'08:00-17:00' overlaps '23:00-09:00' of 'sun' on mon",
        ),
    ],
)
def test_weekly_errors_name_the_key_and_value(weekly: dict[str, list[str]], message: str) -> None:
    assert message in error({"time_zone": NY, "weekly": weekly})


def test_touching_ranges_do_not_overlap() -> None:
    schedule = hours(mon=["08:00-12:00", "12:00-13:00", "22:00-02:00"], tue=["02:00-03:00"])
    assert schedule.is_open(local(NY, 2026, 1, 5, 12, 0))
    assert schedule.is_open(local(NY, 2026, 1, 6, 2, 0))


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({}, "time_zone: Field required"),
        (
            {"time_zone": "America/New_Yrok"},
            "time_zone: 'America/New_Yrok' is not an IANA time zone name (did you mean 'America/New_York'?)",
        ),
        ({"time_zone": "america/new_york"}, "time_zone: 'america/new_york' is not an IANA time zone name"),
        ({"time_zone": "Mars/Olympus"}, "time_zone: 'Mars/Olympus' is not an IANA time zone name"),
        ({"time_zone": "../../etc/passwd"}, "time_zone: '../../etc/passwd' is not an IANA time zone name"),
        ({"time_zone": NY, "timezone": "x"}, "timezone: unknown field"),
        ({"time_zone": NY, "weekly": {"mon": "09:00-17:00"}}, "weekly.mon: Input should be a valid list"),
        (
            {"time_zone": NY, "closures": ["2026-02-30"]},
            "closures.0.date: '2026-02-30' is not a date (YYYY-MM-DD)",
        ),
        ({"time_zone": NY, "closures": ["tomorrow"]}, "closures.0.date: 'tomorrow' is not a date"),
        ({"time_zone": NY, "closures": [20261225]}, "closures.0.date: 20261225 is not a date"),
        (
            {"time_zone": NY, "closures": [dt.datetime(2026, 12, 25, 10)]},
            "closures.0.date: 2026-12-25 10:00:00 has a time of day",
        ),
        ({"time_zone": NY, "closures": [{"from": "13:00"}]}, "closures.0.date: Field required"),
        (
            {"time_zone": NY, "closures": [{"date": "2026-12-31", "until": "13:00"}]},
            "closures.0.until: unknown field",
        ),
        (
            {"time_zone": NY, "closures": [{"date": "2026-12-31", "from": "24:00"}]},
            "closures.0.from: '24:00' is not HH:MM",
        ),
        (
            {"time_zone": NY, "closures": [{"date": "2026-12-31", "from": "1pm"}]},
            "closures.0.from: '1pm' is not HH:MM",
        ),
        (
            {"time_zone": NY, "closures": ["2026-12-25", "2026-12-31", dt.date(2026, 12, 25)]},
            "closures.2: 2026-12-25 is listed twice",
        ),
    ],
)
def test_other_errors_name_the_field_and_value(doc: dict[str, Any], message: str) -> None:
    assert message in error(doc)


def test_an_unquoted_from_time_is_explained() -> None:
    doc = yaml.safe_load("time_zone: UTC\nclosures:\n  - {date: 2026-12-31, from: 13:00}\n")
    assert error(doc) == (
        'closures.0.from: YAML read an unquoted 13:00 as the number 780: quote the time, like from: "13:00"'
    )


def test_errors_inside_a_hours_mapping_name_the_schedule() -> None:
    """How the call flow's ``hours: {name: Hours}`` will word it."""
    doc = yaml.safe_load(EXAMPLE.replace('"13:00-18:00"', '"13:00-26:00"'))["hours"]
    with pytest.raises(ValidationError) as info:
        TypeAdapter(dict[str, Hours]).validate_python(doc)
    where, problem = describe_validation(dict(info.value.errors()[0]))
    assert f"{where}: {problem}" == (
        "office: weekly.mon-fri: '13:00-26:00' is not HH:MM-HH:MM (26:00 is not a time of day)"
    )


# --- the property: is_open is the wall-clock reading checked against the YAML ------------


def days_of(key: str) -> list[str]:
    """``fri-mon`` -> fri, sat, sun, mon: by walking the week, not by arithmetic."""
    first, _, last = key.partition("-")
    days, i = [first], DAYS.index(first)
    while last and DAYS[i] != last:
        i = (i + 1) % 7
        days.append(DAYS[i])
    return days


def reference_is_open(doc: dict[str, Any], moment: dt.datetime) -> bool:
    """Brute force from the raw YAML: walk every closure, key and range for the local reading."""
    wall = moment.astimezone(ZoneInfo(doc["time_zone"]))
    now = wall.hour * 60 + wall.minute
    for closure in doc["closures"]:
        day, since = (closure, "00:00") if isinstance(closure, str) else (closure["date"], closure["from"])
        if wall.date().isoformat() == day and now >= int(since[:2]) * 60 + int(since[3:]):
            return False
    today, yesterday = DAYS[wall.weekday()], DAYS[(wall.weekday() - 1) % 7]
    for key, ranges in doc["weekly"].items():
        days = days_of(key)
        for text in ranges:
            start_text, end_text = text.split("-")
            start = int(start_text[:2]) * 60 + int(start_text[3:])
            end = int(end_text[:2]) * 60 + int(end_text[3:])
            if start < end and today in days and start <= now < end:
                return True
            if start > end and ((today in days and now >= start) or (yesterday in days and now < end)):
                return True
    return False


DAY_KEYS = [*DAYS, "mon-fri", "sat-sun", "fri-mon", "sun-tue", "tue-thu", "mon-sun"]
CLOCK = st.integers(0, 48).map(lambda half_hours: f"{half_hours // 2:02d}:{half_hours % 2 * 30:02d}")
TIME_RANGE = st.tuples(CLOCK, CLOCK).filter(lambda r: r[0] != r[1] and r[0] != "24:00").map("-".join)
TRICKY_ZONES = [NY, LONDON, "Australia/Lord_Howe", "Asia/Kathmandu", "America/St_Johns", "Pacific/Chatham"]
CHANGES = [utc(2026, 3, 8, 7), utc(2026, 11, 1, 6), utc(2026, 3, 29, 1), utc(2026, 10, 25, 1)]
ANYTIME = st.integers(0, 2 * 365 * 24).map(lambda h: utc(2026, 1, 1) + dt.timedelta(hours=h))


@st.composite
def cases(draw: st.DrawFn) -> tuple[dict[str, Any], list[dt.datetime]]:
    """A schedule and moments within three days of one instant (often a DST change), with
    closures on dates around it, and moments on (and a minute either side of) its times."""
    zone = draw(st.one_of(st.sampled_from(TRICKY_ZONES), st.timezone_keys(allow_prefix=False)))
    weekly: dict[str, list[str]] = {}
    for key in draw(st.lists(st.sampled_from(DAY_KEYS), min_size=1, max_size=3)):
        if not any(set(days_of(key)) & set(days_of(other)) for other in weekly):  # each day once
            weekly[key] = draw(st.lists(TIME_RANGE, max_size=3))
    anchor = draw(st.one_of(st.sampled_from(CHANGES), ANYTIME))
    near = st.integers(-3, 3).map(lambda d: anchor.date() + dt.timedelta(days=d))
    closures = draw(
        st.lists(
            st.one_of(
                near.map(dt.date.isoformat),
                st.fixed_dictionaries(
                    {"date": near.map(dt.date.isoformat), "from": CLOCK.filter(lambda t: t != "24:00")}
                ),
            ),
            max_size=3,
            unique_by=lambda c: c if isinstance(c, str) else c["date"],
        )
    )
    times = [t for ranges in weekly.values() for r in ranges for t in r.split("-")]
    times += [c["from"] for c in closures if isinstance(c, dict)]
    anywhere = draw(st.lists(st.integers(-72 * 60, 72 * 60), min_size=0 if times else 1))
    moments = [anchor + dt.timedelta(minutes=m) for m in anywhere]
    for _ in range(draw(st.integers(1, 8)) if times else 0):
        hour, minute = map(int, draw(st.sampled_from(times)).split(":"))
        wall = dt.datetime.combine(draw(near), dt.time(), ZoneInfo(zone)) + dt.timedelta(
            hours=hour, minutes=minute
        )
        wall = wall.replace(fold=draw(st.integers(0, 1)))  # either pass of a repeated hour
        moments.append(wall.astimezone(UTC) + dt.timedelta(minutes=draw(st.integers(-1, 1))))
    return {"time_zone": zone, "weekly": weekly, "closures": closures}, moments


@settings(max_examples=200, deadline=None)
@given(case=cases())
def test_is_open_matches_a_brute_force_reading_of_the_yaml(
    case: tuple[dict[str, Any], list[dt.datetime]],
) -> None:
    doc, moments = case
    try:
        schedule = Hours.model_validate(doc)
    except ValidationError:
        assume(False)  # overlapping ranges: the error tests cover those
        raise
    for moment in moments:
        assert schedule.is_open(moment) is reference_is_open(doc, moment), moment
