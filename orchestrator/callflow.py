"""The call flow: the YAML file users edit to say what the bot says, what callers can
press or say at each step, and where calls are transferred.

A flow is a set of named nodes. A call rests at a node that waits for input (a menu or
a gather); the other kinds pass the call on in the same turn (say, check hours, run an
action) or take it out of the bot (transfer, hang up). Loaded and validated once at
start-up: a bad file stops start-up with one line naming the file, the node and the field.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, Self

import phonenumbers
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from orchestrator.errors import ConfigError, describe_validation
from orchestrator.hours import Hours
from orchestrator.redact import Redactor, compile_pattern
from orchestrator.ssml import clean_text, speak_parts, xml_text

FLOWS = resources.files("orchestrator").joinpath("flows")
DEFAULT_CALLFLOW = "default.yaml"
# The Telephony how-to's own flow, kept as an example: the first thing its readers try.
SAMPLE_CALLFLOW = "transfer-sample.yaml"

INPUT = "input"  # {input}: what the caller just said (redacted)
CALLER = "caller"  # {caller}: the caller's number, masked
KEYS = "0123456789*#"

_E164 = re.compile(r"^\+[1-9]\d{1,14}$")
_TRAILING_PUNCTUATION = ".,!?;: "
# {name}, or {name:digits} (one digit at a time, for a read-back: "1 2 3 4")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(:digits)?\}")
SPEAKING_RATE = 14.0  # characters a second, about 150 words a minute: how long a prompt takes to say


def normalize_input(text: str) -> str:
    """What routes match against: trimmed, case-folded, inner whitespace collapsed.

    Speech recognition ends sentences with punctuation ("Talk to agent."), so trailing
    punctuation is dropped too.
    """
    return " ".join(text.casefold().split()).rstrip(_TRAILING_PUNCTUATION)


def _e164(number: str) -> str:
    if not _E164.match(number):
        raise ValueError(f"{number!r} is not an E.164 number (like +14251231234, no spaces or dashes)")
    try:
        parsed = phonenumbers.parse(number, None)
    except phonenumbers.NumberParseException as e:
        raise ValueError(f"{number!r} is not a phone number: {e}") from e
    # is_possible, not is_valid: test and sample numbers (the reference's +14251231234)
    # are well-formed but not assigned, and the channel dials them all the same.
    if not phonenumbers.is_possible_number(parsed):
        raise ValueError(f"{number!r} is not a possible phone number for its country code")
    return number


def _prompt_list(value: Any) -> Any:
    """``say: welcome`` is ``say: [welcome]``."""
    return [value] if isinstance(value, str) else value


def _key(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # YAML reads `key: 1` as a number
    if not (isinstance(value, str) and len(value) == 1 and value in KEYS):
        raise ValueError(f"{value!r} is not one keypad key (0-9, * or #)")
    return value


def _pattern(value: str) -> str:
    try:
        re.compile(value)
    except re.error as e:
        raise ValueError(f"{value!r} is not a regular expression: {e}") from e
    return value


PhoneNumber = Annotated[str, AfterValidator(_e164)]
Voice = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9:._-]{0,99}$")]
Locale = Annotated[str, StringConstraints(pattern=r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$")]
Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
VariableName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
Key = Annotated[str, BeforeValidator(_key)]
Prompts = Annotated[tuple[Name, ...], BeforeValidator(_prompt_list)]
Seconds = Annotated[float, Field(gt=0, le=3600)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- prompts -----------------------------------------------------------------------------

# What a prompt lets interrupt it (the channel's barge-in, set by each message's inputHint).
BargeIn = Literal["any", "keys", "speech", "none"]
BARGE_IN_HINTS = {
    "any": "acceptingInput",
    "keys": "ignoringSpeechInput",  # only a key press interrupts
    "speech": "ignoringNonSpeechInput",  # only speech interrupts
    "none": "ignoringInput",  # nothing does: a recording notice, a legal disclosure
}


class Prompt(_Strict):
    """Something the bot says: text (``{name}`` puts in a variable), its voice and locale,
    and what may interrupt it."""

    text: Annotated[str, StringConstraints(min_length=1, max_length=4000)]
    voice: Voice | None = None
    locale: Locale | None = None
    barge_in: BargeIn = "any"

    @property
    def variables(self) -> set[str]:
        return {name for name, _ in _PLACEHOLDER.findall(self.text)}


class SpokenPrompt(_Strict):
    """A prompt ready to send: plain text, SSML, the input hint; ``shown`` is the text as
    the transcript keeps it (variables masked)."""

    name: str
    text: str
    ssml: str
    hint: str = "acceptingInput"
    shown: str = ""
    seconds: float = 0.0  # about how long it takes to say (the channel does not report playback)

    @property
    def transcript_text(self) -> str:
        return self.shown or self.text


class _Rendering(NamedTuple):
    """A prompt's text, escaped and wrapped once; placeholders still in it unless ``whole``."""

    whole: SpokenPrompt | None  # the prompt has no placeholder: rendered in full
    text: str
    ssml_head: str  # <speak ...><voice ...>
    ssml_text: str  # the text, escaped for XML
    ssml_tail: str  # </voice></speak>
    hint: str


# --- routes, timers and nodes ------------------------------------------------------------


class Route(_Strict):
    """Caller input that leads somewhere: a keypad key, spoken phrases, or both."""

    key: Key | None = None
    phrases: list[Annotated[str, StringConstraints(min_length=1)]] = Field(default_factory=list)
    to: Name | None = None  # a node
    repeat: bool = False  # say the current node's prompt again

    @model_validator(mode="after")
    def _shape(self) -> Self:
        if self.key is None and not self.phrases:
            raise ValueError("a route needs a 'key' to press, 'phrases' to say, or both")
        if (self.to is None) == (not self.repeat):
            raise ValueError("a route needs exactly one of 'to: <node>' or 'repeat: true'")
        for phrase in self.phrases:
            if not normalize_input(phrase):
                raise ValueError(f"phrases: {phrase!r} is only spaces and punctuation")
        return self


class Retry(_Strict):
    """What happens when the caller gives no input, or input no route takes: say ``say``
    (then the node's prompt again, unless ``repeat`` is false) up to ``max`` times, then go
    to ``then``. Without ``max`` it goes on for ever."""

    say: Prompts = ()
    repeat: bool = True
    max: int | None = Field(default=None, ge=0, le=20)
    then: Name | None = None

    @model_validator(mode="after")
    def _then(self) -> Self:
        if (self.max is None) != (self.then is None):
            raise ValueError("'max' and 'then' go together: after that many, the call goes to 'then'")
        return self


class NoInput(Retry):
    """No input for ``seconds`` after the prompt was spoken (its speaking time estimated:
    the channel does not say when playback ends)."""

    seconds: Seconds = 5.0


class Defaults(_Strict):
    """What every waiting node does unless it says otherwise (``no_input: null``: no timer)."""

    no_input: NoInput | None = NoInput()
    no_match: Retry = Retry()


class _Node(_Strict):
    say: Prompts = ()  # said on arrival, in order


class Menu(_Node):
    """Waits for the caller; its routes first, then the flow's global ones."""

    type: Literal["menu"]
    routes: list[Route] = Field(default_factory=list)
    global_routes: bool = True
    no_input: NoInput | Literal["default"] | None = "default"
    no_match: Retry | Literal["default"] = "default"


class Say(_Node):
    """Says its prompts and goes on at once."""

    type: Literal["say"]
    next: Name


class Gather(_Node):
    """Collects keypad (or spoken) digits into a variable."""

    type: Literal["gather"]
    into: VariableName
    min_digits: int = Field(1, ge=1, le=40)
    max_digits: int = Field(20, ge=1, le=40)
    finish_key: Key | None = "#"
    inter_digit_seconds: Seconds = 3.0  # between keys: past it, what was pressed is taken
    pattern: Annotated[str, AfterValidator(_pattern)] | None = None  # the whole value must match
    confirm: Name | None = None  # a prompt reading it back: 1 confirms, 2 tries again
    invalid: Prompts = ()  # said when the digits do not fit, before asking again
    attempts: int = Field(3, ge=1, le=10)
    next: Name
    on_fail: Name  # after ``attempts`` entries that do not fit (silence goes by its no_input)
    no_input: NoInput | Literal["default"] | None = "default"

    @model_validator(mode="after")
    def _lengths(self) -> Self:
        if self.min_digits > self.max_digits:
            raise ValueError(f"min_digits {self.min_digits} is more than max_digits {self.max_digits}")
        return self

    def fits(self, digits: str) -> bool:
        ok = self.min_digits <= len(digits) <= self.max_digits
        return ok and (self.pattern is None or re.fullmatch(self.pattern, digits) is not None)


class TransferTo(_Node):
    """Transfers the call to a queue's agents."""

    type: Literal["transfer"]
    queue: Name


class HangUp(_Node):
    """Says its prompts, then ends the call."""

    type: Literal["hang_up"]
    reason: Annotated[str, StringConstraints(min_length=1, max_length=200)] = "the flow hung up"


class CheckHours(_Node):
    """Goes to ``open`` or ``closed`` by a schedule in ``hours:``."""

    type: Literal["hours"]
    hours: Name
    open: Name
    closed: Name


class Action(_Node):
    """Runs a Python function of the user's (``package.module:function``)."""

    type: Literal["action"]
    action: Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")]
    # Well inside a turn's budget (the channel's answer is due in 15 s) and a timer's claim.
    timeout_seconds: float = Field(5.0, gt=0, le=10)
    next: Name
    on_error: Name
    may_go: list[Name] = Field(default_factory=list)  # other nodes the function may send the call to
    sets: list[VariableName] = Field(default_factory=list)  # variables the function may set


Node = Annotated[Menu | Say | Gather | TransferTo | HangUp | CheckHours | Action, Field(discriminator="type")]
WAITING = (Menu, Gather)
NODE_TYPES = ("menu", "say", "gather", "transfer", "hang_up", "hours", "action")


class Pool(_Strict):
    """Numbers the telephony side routes to the same agents: a warm transfer leases one to a
    call and dials it, and the agent side looks the call up by the number it sees dialled
    (docs/warm-transfer.md)."""

    numbers: Annotated[list[PhoneNumber], Field(min_length=1, max_length=1000)]
    # How long a number stays the call's after its transfer connects or its context is
    # claimed: for the agent side to look it up (again).
    grace_seconds: Seconds = 30.0

    @field_validator("numbers")
    @classmethod
    def _distinct(cls, numbers: list[str]) -> list[str]:
        if len(set(numbers)) != len(numbers):
            twice = sorted({n for n in numbers if numbers.count(n) > 1})
            raise ValueError(f"{', '.join(twice)} listed twice")
        return numbers


class PoolExhausted(_Strict):
    """What a transfer to a queue does when every number of its pool is held."""

    then: Literal["target", "hold", "fail"] = "target"  # dial the queue's target, cold
    # hold: said at each hold; fail: said instead of the queue's ``final`` (which holds that
    # run out say)
    say: Prompts = ()
    seconds: Seconds = 15.0  # hold: how long before leasing again
    max: Annotated[int, Field(ge=1, le=100)] = 4  # hold: holds before it fails


class Queue(_Strict):
    """Where a transfer goes: targets in order (wrapping), attempts, watchdog, prompts, hours,
    and the pool a warm transfer leases its number from."""

    targets: Annotated[list[PhoneNumber], Field(min_length=1)]
    timeout_seconds: Seconds = 60.0  # no-answer watchdog: the channel redials for ever and never says
    max_attempts: int = Field(3, ge=1, le=20)  # transfers to this queue per call
    announce: Prompts = ()  # said just before each transfer
    retry: Prompts  # a transfer failed and attempts remain
    final: Prompts  # a transfer failed and none remain
    handback: Prompts  # an agent handed the call back (handoff.status completed)
    hours: Name | None = None
    closed: Name | None = None  # where a call goes when the hours say closed
    on_failure: Name | None = None  # where a call waits after a failure (default: where it was)
    after_final: Name | None = None  # where a call goes after the last failure (default: stays)
    pool: Name | None = None  # lease a number from this pool and dial it instead of the target
    pool_exhausted: PoolExhausted = PoolExhausted()

    @model_validator(mode="after")
    def _closed(self) -> Self:
        if (self.hours is None) != (self.closed is None):
            raise ValueError(
                "'hours' and 'closed' go together: the schedule, and where a closed queue sends calls"
            )
        return self

    def target_for(self, attempt: int) -> str:
        """Attempt 1 dials the first target, attempt 2 the next, wrapping around."""
        return self.targets[(attempt - 1) % len(self.targets)]


# --- privacy -----------------------------------------------------------------------------


def _digit_runs(n: int) -> int:
    if 0 < n < 4:
        raise ValueError(f"runs of {n} digits would redact menu choices: use 0 (off), or 4 or more")
    return n


class RedactionPattern(_Strict):
    """One more redaction rule: text matching ``pattern`` becomes ``replace_with``."""

    pattern: Annotated[
        str, StringConstraints(min_length=1), AfterValidator(lambda p: compile_pattern(p).pattern)
    ]
    replace_with: str = "[redacted]"  # literal text: no group references, a backslash is a backslash


class Privacy(_Strict):
    """What is redacted from caller words before they are stored or shown (docs/privacy.md)."""

    digit_runs: Annotated[int, Field(ge=0, le=40), AfterValidator(_digit_runs)] = 7
    keep_last_digits: Annotated[int, Field(ge=0, le=4)] = 4
    caller_number: bool = True
    patterns: list[RedactionPattern] = Field(default_factory=list)
    # "full": the handoff.initiate sent in the turn carries the caller's words as said (never
    # stored: a re-sent handoff, and lines another instance or an earlier process took,
    # carry the redacted text).
    agent_transcript: Literal["redacted", "full"] = "redacted"
    # The caller's number in a warm transfer's context: masked (all but keep_last_digits) or full.
    agent_caller_number: Literal["masked", "full"] = "masked"

    @property
    def full_transcript(self) -> bool:
        """Whether the agent gets the caller's words as said (``agent_transcript: full``)."""
        return self.agent_transcript == "full"

    def redactor(self) -> Redactor:
        """A redactor for these rules (every regex compiled once, here)."""
        return Redactor(
            digit_runs=self.digit_runs,
            keep_last=self.keep_last_digits,
            caller_number=self.caller_number,
            patterns=[(compile_pattern(p.pattern), p.replace_with) for p in self.patterns],
        )

    def caller_for_agent(self, number: str) -> str:
        """The caller's number as a warm transfer's context shows it to the agent."""
        if self.agent_caller_number == "full" or not number:
            return number
        digits = sum(c.isdigit() for c in number)
        keep = min(self.keep_last_digits, digits // 3)
        masked, left = [], digits - keep
        for c in number:
            if c.isdigit() and left > 0:
                masked.append("*")
                left -= 1
            else:
                masked.append(c)
        return "".join(masked)

    def mask_value(self, value: str) -> str:
        """A collected value as stored for views and logs: a ``*`` per character but the
        last few, never more than a third of it (a PIN shows nothing)."""
        keep = min(self.keep_last_digits, len(value) // 3)
        return "*" * (len(value) - keep) + value[len(value) - keep :]


# --- the flow ----------------------------------------------------------------------------


class Edge(NamedTuple):
    """One way on from a node: ``how`` (a field, or a route's keys and phrases) and where."""

    how: str
    to: str | None  # None: back to the node the call last waited at
    shared: bool = False  # a global route or default retry: the same at every waiting node


class CallFlow(_Strict):
    """The whole flow file."""

    voice: Voice = "en-US-JennyNeural"
    locale: Locale = "en-US"
    # Characters a second the voices say: no-input is counted from the estimated end of the prompt.
    speaking_rate: float = Field(SPEAKING_RATE, gt=0, le=1000)
    prompts: dict[Name, Prompt]
    start: Name
    defaults: Defaults = Defaults()
    routes: list[Route] = Field(default_factory=list)  # global: at every menu unless it says otherwise
    nodes: dict[Name, Node]
    queues: dict[Name, Queue] = Field(default_factory=dict)
    hours: dict[Name, Hours] = Field(default_factory=dict)
    pools: dict[Name, Pool] = Field(default_factory=dict)
    privacy: Privacy = Privacy()  # frozen: one shared default is safe

    @model_validator(mode="after")
    def _references(self) -> Self:
        for where, kind, name in self._references_by_kind():
            tables: dict[str, Mapping[str, object]] = {
                "prompt": self.prompts,
                "node": self.nodes,
                "queue": self.queues,
                "hours": self.hours,
                "pool": self.pools,
            }
            table = tables[kind]
            if name not in table:
                raise ValueError(f"{where}: no {kind} named {name!r} (known: {', '.join(sorted(table))})")
        self._check_routes("routes", self.routes)
        for name, node in self.nodes.items():
            if isinstance(node, Menu):
                self._check_routes(f"nodes.{name}.routes", node.routes)
        self._check_variables()
        self._check_pools()
        self._check_loops()
        self._check_reachable()
        return self

    def _references_by_kind(self) -> Iterator[tuple[str, str, str]]:
        """(where, kind, name) of every reference the file makes."""
        yield "start", "node", self.start
        for i, route in enumerate(self.routes):
            if route.to:
                yield f"routes.{i}.to", "node", route.to
        for field in ("no_input", "no_match"):
            retry = getattr(self.defaults, field)
            if retry is not None:
                yield from self._retry_references(f"defaults.{field}", retry)
        for name, node in self.nodes.items():
            where = f"nodes.{name}"
            for prompt in node.say:
                yield f"{where}.say", "prompt", prompt
            for i, route in enumerate(getattr(node, "routes", ())):
                if route.to is not None:
                    yield f"{where}.routes.{i}.to", "node", route.to
            for field, kind, value in _node_links(node):
                yield f"{where}.{field}", kind, value
            for field in ("no_input", "no_match"):
                retry = getattr(node, field, None)
                if isinstance(retry, Retry):
                    yield from self._retry_references(f"{where}.{field}", retry)
        for name, queue in self.queues.items():
            where = f"queues.{name}"
            for field in ("announce", "retry", "final", "handback"):
                for prompt in getattr(queue, field):
                    yield f"{where}.{field}", "prompt", prompt
            if queue.hours is not None:
                yield f"{where}.hours", "hours", queue.hours
            for field in ("closed", "on_failure", "after_final"):
                if (value := getattr(queue, field)) is not None:
                    yield f"{where}.{field}", "node", value
            if queue.pool is not None:
                yield f"{where}.pool", "pool", queue.pool
            for prompt in queue.pool_exhausted.say:
                yield f"{where}.pool_exhausted.say", "prompt", prompt

    @staticmethod
    def _retry_references(where: str, retry: Retry) -> Iterator[tuple[str, str, str]]:
        for prompt in retry.say:
            yield f"{where}.say", "prompt", prompt
        if retry.then is not None:
            yield f"{where}.then", "node", retry.then

    @staticmethod
    def _check_routes(where: str, routes: list[Route]) -> None:
        keys: dict[str, int] = {}
        phrases: dict[str, int] = {}
        for i, route in enumerate(routes):
            if route.key is not None:
                if route.key in keys:
                    raise ValueError(
                        f"{where}.{i}.key: {route.key!r} is already used by {where}.{keys[route.key]}"
                    )
                keys[route.key] = i
            for phrase in route.phrases:
                said = normalize_input(phrase)
                if said in phrases:
                    raise ValueError(
                        f"{where}.{i}.phrases: {phrase!r} is already used by {where}.{phrases[said]}"
                    )
                phrases[said] = i

    def _check_variables(self) -> None:
        known = {INPUT, CALLER}
        for node in self.nodes.values():
            if isinstance(node, Gather):
                known.add(node.into)
            elif isinstance(node, Action):
                known.update(node.sets)
        for name, prompt in self.prompts.items():
            for variable in sorted(prompt.variables - known):
                raise ValueError(
                    f"prompts.{name}.text: {{{variable}}} is no variable of this flow "
                    f"(a gather's 'into', an action's 'sets', or {{input}} and {{caller}})"
                )

    def _check_pools(self) -> None:
        """A number is in one pool only, and no queue dials it cold: the agent side finds a
        call by the number alone, and a cold transfer to it would show another call's."""
        owner: dict[str, str] = {}
        for name, pool in self.pools.items():
            for i, number in enumerate(pool.numbers):
                if number in owner:
                    raise ValueError(f"pools.{name}.numbers.{i}: {number} is also in pool {owner[number]!r}")
                owner[number] = name
        for name, queue in self.queues.items():
            for i, number in enumerate(queue.targets):
                if number in owner:
                    raise ValueError(
                        f"queues.{name}.targets.{i}: {number} is a number of pool {owner[number]!r}: "
                        "a pool's numbers are only ever leased"
                    )

    def _check_loops(self) -> None:
        """A cycle of nodes that never wait for the caller would spin for ever (a transfer
        passes a call on too: to its queue's ``closed`` node, or ``after_final``)."""
        kinds = Say | CheckHours | Action | TransferTo
        passing = {name for name, node in self.nodes.items() if isinstance(node, kinds)}
        visiting: list[str] = []
        done: set[str] = set()

        def visit(name: str) -> None:
            if name in done or name not in passing:
                return
            if name in visiting:
                loop = [*visiting[visiting.index(name) :], name]
                raise ValueError(f"nodes.{name}: a loop with no input: {' -> '.join(loop)}")
            visiting.append(name)
            node = self.nodes[name]
            for _, kind, target in _node_links(node):
                if kind == "node":
                    visit(target)
            if isinstance(node, TransferTo):
                queue = self.queues[node.queue]
                for then in (queue.closed, queue.after_final):
                    if then is not None:
                        visit(then)
            visiting.pop()
            done.add(name)

        for name in sorted(passing):
            visit(name)

    def _check_reachable(self) -> None:
        reached = set(self.reachable())
        for name in self.nodes:
            if name not in reached:
                raise ValueError(f"nodes.{name}: unreachable: no route, next or other node leads to it")

    def edges(self, name: str) -> Iterator[Edge]:
        """Every way on from node ``name``: its links, its routes and the global ones, its
        retries', and those of the queue it transfers to (back where the call waited too)."""
        node = self.nodes[name]
        for field, kind, target in _node_links(node):
            if kind == "node":
                yield Edge(field.partition(".")[0], target)  # may_go.0: one label for all
        if isinstance(node, WAITING):
            routes = [(route, False) for route in node.routes] if isinstance(node, Menu) else []
            if isinstance(node, Gather):  # keys pressed there are digits: only speech routes
                routes += [(route, True) for route in self.routes if route.phrases]
            elif node.global_routes:
                routes += [(route, True) for route in self.routes]
            for route, shared in routes:
                if route.to is not None:
                    yield Edge(_route_label(route), route.to, shared)
            # A gather's misfits go to on_fail by its attempts: it has no no_match.
            for field in ("no_input",) if isinstance(node, Gather) else ("no_input", "no_match"):
                retry = self.retry_of(node, field)
                if retry is not None and retry.then is not None:
                    yield Edge(field, retry.then, getattr(node, field, "default") == "default")
        if isinstance(node, TransferTo):
            queue = self.queues[node.queue]
            if queue.closed is not None:
                yield Edge("closed", queue.closed)
            yield Edge("transfer failed", queue.on_failure)
            yield Edge("no attempts left", queue.after_final)
            if queue.pool is not None and queue.pool_exhausted.then != "target":
                yield Edge("pool exhausted", queue.after_final)
            yield Edge("handback", None)

    def reachable(self) -> Iterator[str]:
        """The nodes a call can reach from ``start``, in the order first found."""
        seen, todo = {self.start}, [self.start]
        while todo:
            name = todo.pop(0)
            yield name
            for edge in self.edges(name):
                if edge.to is not None and edge.to not in seen:
                    seen.add(edge.to)
                    todo.append(edge.to)

    @cached_property
    def first_stop(self) -> str:
        """The node a call first waits at: ``start``, past any ``say`` nodes."""
        name = self.start
        for _ in self.nodes:
            node = self.nodes[name]
            if not isinstance(node, Say):
                break
            name = node.next
        return name

    @property
    def collects_variables(self) -> bool:
        """Whether calls collect values (gathers, actions' ``sets``): they are sealed in Redis."""
        return any(isinstance(n, Gather) or (isinstance(n, Action) and n.sets) for n in self.nodes.values())

    @cached_property
    def pool_of_number(self) -> dict[str, str]:
        """Each pooled number's pool."""
        return {number: name for name, pool in self.pools.items() for number in pool.numbers}

    def retry_of(self, node: Menu | Gather, field: str) -> Retry | None:
        """The node's ``no_input`` or ``no_match``, or the flow's default."""
        value: Retry | str | None = getattr(node, field, "default")
        if isinstance(value, str):  # "default"
            default: Retry | None = getattr(self.defaults, field)
            return default
        return value

    def no_input_of(self, node: Menu | Gather) -> NoInput | None:
        retry = self.retry_of(node, "no_input")
        return retry if isinstance(retry, NoInput) else None

    # Built on first use and kept: the model is frozen. cached_property, not PrivateAttr,
    # because pydantic's private attributes are slow to read and a turn reads these.
    @cached_property
    def _global_routes(self) -> tuple[dict[str, Route], dict[str, Route]]:
        return _route_tables(self.routes)

    @cached_property
    def _node_routes(self) -> dict[str, tuple[dict[str, Route], dict[str, Route]]]:
        return {
            name: _route_tables(node.routes) for name, node in self.nodes.items() if isinstance(node, Menu)
        }

    @cached_property
    def redact(self) -> Redactor:
        """The flow's redaction rules, compiled once: ``redact(text, caller)``."""
        return self.privacy.redactor()

    @cached_property
    def _renderings(self) -> dict[str, _Rendering]:
        renderings = {}
        for name, prompt in self.prompts.items():
            head, tail = speak_parts(prompt.voice or self.voice, prompt.locale or self.locale)
            text, ssml_text = clean_text(prompt.text), xml_text(prompt.text)
            hint = BARGE_IN_HINTS[prompt.barge_in]
            whole = None
            if not prompt.variables:
                whole = SpokenPrompt(
                    name=name, text=text, ssml=head + ssml_text + tail, hint=hint, seconds=self._saying(text)
                )
            renderings[name] = _Rendering(whole, text, head, ssml_text, tail, hint)
        return renderings

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy without the caches: pydantic copies ``__dict__``, where they live."""
        copied = super().model_copy(update=update, deep=deep)
        caches = ("_global_routes", "_node_routes", "_renderings", "redact", "first_stop", "pool_of_number")
        for cache in caches:
            copied.__dict__.pop(cache, None)
        return copied

    def is_fixed(self, name: str) -> bool:
        """Whether prompt ``name`` has no placeholders (it renders the same every time)."""
        return self._renderings[name].whole is not None

    def route_for(self, node: str, text: str, *, keypad: bool) -> Route | None:
        """The route the caller's input takes at ``node``: a key press matches keys, anything
        else phrases; the node's own routes first, then the global ones."""
        said = text.strip() if keypad else normalize_input(text)
        tables = [self._node_routes.get(node)]
        current = self.nodes.get(node)
        if not isinstance(current, Menu) or current.global_routes:
            tables.append(self._global_routes)
        for table in tables:
            if table is not None and (route := table[0 if keypad else 1].get(said)) is not None:
                return route
        return None

    def render(
        self, name: str, values: Mapping[str, str] | None = None, shown: Mapping[str, str] | None = None
    ) -> SpokenPrompt:
        """A prompt in its voice; each ``{name}`` becomes its value, escaped for SSML, and in
        the transcript's copy (``shown``) its masked value.

        Escaping and wrapping a prompt's own text is done once, not every turn; a prompt
        without placeholders is the same (frozen) SpokenPrompt every time.
        """
        rendering = self._renderings[name]
        if rendering.whole is not None:
            return rendering.whole
        values = values or {}

        def fill(template: str, escape: Any, table: Mapping[str, str]) -> str:
            def value(m: re.Match[str]) -> str:
                found = table.get(m[1], "")
                return str(escape(" ".join(found) if m[2] else found))

            return _PLACEHOLDER.sub(value, template)

        text = fill(rendering.text, clean_text, values)
        ssml = rendering.ssml_head + fill(rendering.ssml_text, xml_text, values) + rendering.ssml_tail
        masked = fill(rendering.text, clean_text, {**values, **(shown or {})})
        return SpokenPrompt(
            name=name,
            text=text,
            ssml=ssml,
            hint=rendering.hint,
            shown=masked if masked != text else "",
            seconds=self._saying(text),
        )

    def _saying(self, text: str) -> float:
        return len(text) / self.speaking_rate


def _route_label(route: Route) -> str:
    said = [f'"{p}"' for p in route.phrases[:2]]
    return " / ".join(([f"press {route.key}"] if route.key is not None else []) + said)


def _route_tables(routes: list[Route]) -> tuple[dict[str, Route], dict[str, Route]]:
    """(by key, by normalised phrase)."""
    keys = {route.key: route for route in routes if route.key is not None}
    phrases = {normalize_input(p): route for route in routes for p in route.phrases}
    return keys, phrases


def _node_links(node: Any) -> Iterator[tuple[str, str, str]]:
    """(field, kind, name) of a node's own links to nodes, queues and hours."""
    for field in ("next", "on_fail", "open", "closed", "on_error"):
        if (value := getattr(node, field, None)) is not None:
            yield field, "node", value
    if isinstance(node, Gather) and node.confirm is not None:
        yield "confirm", "prompt", node.confirm
    if isinstance(node, Gather):
        for prompt in node.invalid:
            yield "invalid", "prompt", prompt
    if isinstance(node, Action):
        for i, value in enumerate(node.may_go):
            yield f"may_go.{i}", "node", value
    if isinstance(node, TransferTo):
        yield "queue", "queue", node.queue
    if isinstance(node, CheckHours):
        yield "hours", "hours", node.hours


def shipped_flow(name: str) -> Path:
    """The path of a flow file shipped with the product (``default.yaml``, ...)."""
    return Path(str(FLOWS.joinpath(name)))


def load_callflow(path: Path | None = None) -> CallFlow:
    """Load and validate a flow file (the built-in default when ``path`` is None)."""
    if path is None:
        label, raw = DEFAULT_CALLFLOW, FLOWS.joinpath(DEFAULT_CALLFLOW).read_text(encoding="utf-8")
    else:
        label = str(path)
        try:
            raw = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(label, f"cannot read the call flow file: {e}") from e
    return parse_callflow(raw, label)


def parse_callflow(raw: str, label: str = "callflow") -> CallFlow:
    """Parse flow YAML text; errors name ``label`` and the field."""
    try:
        data = yaml.safe_load(raw)
    except ValueError as e:  # YAML read an impossible date (2026-02-30) and said only that
        raise ConfigError(label, f"not valid YAML: {e}") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{label}:{mark.line + 1}" if mark is not None else label
        problem = getattr(e, "problem", None) or " ".join(str(e).split())
        raise ConfigError(where, f"not valid YAML: {problem}") from e
    if not isinstance(data, dict):
        raise ConfigError(label, "the call flow must be a YAML mapping (prompts, nodes, queues, ...)")
    try:
        return CallFlow.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = list(first["loc"])
        if len(loc) > 2 and loc[0] == "nodes" and loc[2] in NODE_TYPES:
            del loc[2]  # pydantic names the node's type in the path: the user wrote no such field
        where, problem = describe_validation({**first, "loc": tuple(loc)})
        # A whole-flow check names its own place: "nodes.billing.routes.0.key: ..."
        if not where and re.match(r"^[\w.-]+: ", problem):
            where, _, problem = problem.partition(": ")
        raise ConfigError(f"{label}: {where}" if where else label, problem) from e
