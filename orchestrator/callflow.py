"""The call flow: the YAML file users edit to say what the bot says and where it transfers.

Loaded and validated once at start-up; a bad file stops start-up with one line that
names the field and the problem.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, Self

import phonenumbers
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from orchestrator.errors import ConfigError, describe_validation
from orchestrator.redact import Redactor, compile_pattern
from orchestrator.ssml import clean_text, speak_parts, xml_text

DEFAULT_CALLFLOW = "callflow.default.yaml"
INPUT_PLACEHOLDER = "{input}"

_E164 = re.compile(r"^\+[1-9]\d{1,14}$")
_TRAILING_PUNCTUATION = ".,!?;: "


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


PhoneNumber = Annotated[str, AfterValidator(_e164)]
Voice = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9:._-]{0,99}$")]
Locale = Annotated[str, StringConstraints(pattern=r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$")]
PromptName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Prompt(_Strict):
    """Something the bot says: text, and the voice and locale it is spoken in."""

    text: Annotated[str, StringConstraints(min_length=1, max_length=4000)]
    voice: Voice | None = None
    locale: Locale | None = None


class Route(_Strict):
    """Caller inputs that lead to an action: say a prompt, or transfer to an agent."""

    match: Annotated[list[Annotated[str, StringConstraints(min_length=1)]], Field(min_length=1)]
    say: PromptName | None = None
    transfer: bool = False

    @model_validator(mode="after")
    def _one_action(self) -> Self:
        if (self.say is None) == (not self.transfer):
            raise ValueError("a route needs exactly one action: 'say: <prompt>' or 'transfer: true'")
        return self


class Transfer(_Strict):
    """Where transfers go and what the caller hears when they fail."""

    targets: Annotated[list[PhoneNumber], Field(min_length=1)]
    timeout_seconds: float = Field(60, ge=1, le=3600)
    max_attempts: int = Field(3, ge=1, le=20)
    announce_prompt: PromptName | None = None
    retry_prompt: PromptName
    final_prompt: PromptName
    handback_prompt: PromptName

    def target_for(self, attempt: int) -> str:
        """Attempt 1 dials the first target, attempt 2 the next, wrapping around."""
        return self.targets[(attempt - 1) % len(self.targets)]


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


class SpokenPrompt(_Strict):
    """A prompt ready to send: plain text and SSML."""

    name: str
    text: str
    ssml: str


class _Rendering(NamedTuple):
    """A prompt's text, escaped and wrapped once; ``{input}`` still in it unless ``whole``."""

    whole: SpokenPrompt | None  # the prompt has no {input}: rendered in full
    text: str
    ssml_head: str  # <speak ...><voice ...>
    ssml_text: str  # the text, escaped for XML
    ssml_tail: str  # </voice></speak>


class CallFlow(_Strict):
    """The whole flow file."""

    voice: Voice = "en-US-JennyNeural"
    locale: Locale = "en-US"
    prompts: dict[PromptName, Prompt]
    start_prompt: PromptName
    routes: list[Route] = Field(default_factory=list)
    fallback_prompt: PromptName
    transfer: Transfer
    privacy: Privacy = Privacy()  # frozen: one shared default is safe

    @model_validator(mode="after")
    def _prompts_exist(self) -> Self:
        refs = {
            "start_prompt": self.start_prompt,
            "fallback_prompt": self.fallback_prompt,
            "transfer.retry_prompt": self.transfer.retry_prompt,
            "transfer.final_prompt": self.transfer.final_prompt,
            "transfer.handback_prompt": self.transfer.handback_prompt,
            "transfer.announce_prompt": self.transfer.announce_prompt,
            **{f"routes.{i}.say": route.say for i, route in enumerate(self.routes)},
        }
        for where, name in refs.items():
            if name is not None and name not in self.prompts:
                raise ValueError(f"{where}: no prompt named {name!r} in prompts")
        seen: dict[str, int] = {}
        for i, route in enumerate(self.routes):
            for phrase in route.match:
                key = normalize_input(phrase)
                if not key:
                    raise ValueError(f"routes.{i}.match: {phrase!r} is only spaces and punctuation")
                if key in seen:
                    raise ValueError(f"routes.{i}.match: {phrase!r} is already matched by routes.{seen[key]}")
                seen[key] = i
        return self

    # Built on first use and kept: the model is frozen. cached_property, not PrivateAttr,
    # because pydantic's private attributes are slow to read and a turn reads this twice.
    @cached_property
    def _routes(self) -> dict[str, Route]:
        return {normalize_input(p): route for route in self.routes for p in route.match}

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
            whole = None
            if INPUT_PLACEHOLDER not in prompt.text:
                whole = SpokenPrompt(name=name, text=text, ssml=head + ssml_text + tail)
            renderings[name] = _Rendering(whole, text, head, ssml_text, tail)
        return renderings

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy without the caches: pydantic copies ``__dict__``, where they live."""
        copied = super().model_copy(update=update, deep=deep)
        for cache in ("_routes", "_renderings", "redact"):
            copied.__dict__.pop(cache, None)
        return copied

    def route_for(self, text: str) -> Route | None:
        """The route the caller's input selects, or None for the fallback."""
        return self._routes.get(normalize_input(text))

    def render(self, name: str, caller_input: str = "") -> SpokenPrompt:
        """A prompt in its voice; ``{input}`` becomes the caller's words, escaped for SSML.

        Escaping and wrapping a prompt's own text is done once, not every turn; a prompt
        without ``{input}`` is the same (frozen) SpokenPrompt every time.
        """
        rendering = self._renderings[name]
        if rendering.whole is not None:
            return rendering.whole
        text = rendering.text.replace(INPUT_PLACEHOLDER, clean_text(caller_input))
        ssml_text = rendering.ssml_text.replace(INPUT_PLACEHOLDER, xml_text(caller_input))
        ssml = rendering.ssml_head + ssml_text + rendering.ssml_tail
        return SpokenPrompt(name=name, text=text, ssml=ssml)


def load_callflow(path: Path | None = None) -> CallFlow:
    """Load and validate a flow file (the built-in default when ``path`` is None)."""
    if path is None:
        source = resources.files("orchestrator").joinpath(DEFAULT_CALLFLOW)
        label, raw = DEFAULT_CALLFLOW, source.read_text(encoding="utf-8")
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
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{label}:{mark.line + 1}" if mark is not None else label
        problem = getattr(e, "problem", None) or " ".join(str(e).split())
        raise ConfigError(where, f"not valid YAML: {problem}") from e
    if not isinstance(data, dict):
        raise ConfigError(label, "the call flow must be a YAML mapping (prompts, routes, transfer, ...)")
    try:
        return CallFlow.model_validate(data)
    except ValidationError as e:
        where, problem = describe_validation(dict(e.errors()[0]))
        raise ConfigError(f"{label}: {where}" if where else label, problem) from e
