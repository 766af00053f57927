"""``simulate`` without a scenario: one call, typed in as the caller and the agent side.

Whatever the bot sends is printed as it arrives, by a task watching the channel for the
current call, so a prompt the bot sends on its own (the no-answer watchdog) shows up
while the prompt waits for input. Input is read off the event loop for that reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
from rich.console import Console
from rich.text import Text

from simulator.call import (
    MAX_SILENCE,
    Bots,
    Mismatch,
    Protocol,
    SimulatedCall,
    Transport,
    check_silence,
    describe,
    is_hangup,
    is_transfer,
    target_of,
    transcript_of,
    voice_of,
)
from simulator.channel import ChannelStandIn, check_keys
from simulator.cli import wired

HISTORY_FILE = Path("~/.cache/cc-orchestrator/simulate_history")
AGENT_HINT = "the agent side: accept | fail [MESSAGE] | noanswer | complete"

# word -> (arguments, what it does); the order is the order of `help`.
COMMANDS: dict[str, tuple[str, str]] = {
    "say": ("TEXT", "the caller says TEXT (any line that is not a command is said too)"),
    "press": ("DIGITS", "keypad tones: 0-9, * and #, one message per key"),
    "silence": ("SECONDS", f"the caller does nothing this long (at most {MAX_SILENCE:g}); the bot may speak"),
    "accept": ("", "the agent answers (telephony: the call ends for the bot; generic: status accepted)"),
    "fail": ("[MESSAGE]", "the transfer fails: handoff.status failed"),
    "noanswer": ("", "nobody picks up: the channel redials and tells the bot nothing"),
    "complete": ("", "the agent hands the caller back: handoff.status completed"),
    "hangup": ("", "the caller hangs up: endOfConversation"),
    "dup": ("", "deliver the last activity again, same id"),
    "late": ("STATE [MESSAGE]", "a handoff.status out of turn (e.g. after the transfer is over)"),
    "status": ("STATE [MESSAGE]", "any handoff.status"),
    "new": ("", "hang up this call if it is live, start a new one"),
    "help": ("", "this list"),
    "quit": ("", "leave, hanging up a live call (also exit, Ctrl-D)"),
}
QUIT_WORDS = {"quit", "exit"}


def _row(
    console: Console, label: str, body: Text, style: str = "", indent: int = 7, align: str = ">"
) -> Text:
    """One entry of the session: a right-aligned label, then the text, wrapped under
    itself (wrapped here rather than by a table, which pads every line with spaces)."""
    row = Text()
    for n, line in enumerate(body.wrap(console, max(console.width - indent - 1, 20), overflow="fold")):
        line.rstrip()
        row.append("\n" if n else "")
        row.append(f"{label if n == 0 else '':{align}{indent}} ", style=style if n == 0 else "")
        row.append_text(line)
    return row


class _Reader:
    """Where commands come from; ``None`` is the end of input (Ctrl-D)."""

    # A prompt waits for input on the terminal: output must redraw it (see _Session.emit).
    waiting = False
    prompt = ""

    async def read(self) -> str | None:
        raise NotImplementedError

    def close(self) -> None:
        """Undo what reading changed (terminal modes, history)."""


class _LinesReader(_Reader):
    """Commands from an async iterator (tests), echoed as if typed."""

    def __init__(self, lines: AsyncIterator[str], console: Console) -> None:
        self.lines, self.console = lines, console

    async def read(self) -> str | None:
        try:
            line = await anext(self.lines)
        except StopAsyncIteration:
            return None
        self.console.print(Text.assemble(("caller> ", "bold cyan"), line))
        return line


def _in_thread(read: Callable[[], str | None]) -> Awaitable[str | None]:
    """Run a blocking read in a daemon thread. Not ``asyncio.to_thread``: its pool thread
    is joined at shutdown, so after Ctrl-C the process would wait for an Enter."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[str | None] = loop.create_future()

    def deliver(result: str | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def work() -> None:
        result, error = None, None
        try:
            result = read()
        except EOFError:
            pass
        except Exception as e:
            error = e
        with contextlib.suppress(RuntimeError):  # the loop is gone: we are exiting anyway
            loop.call_soon_threadsafe(deliver, result, error)

    threading.Thread(target=work, name="simulate-input", daemon=True).start()
    return future


class _PipeReader(_Reader):
    """Commands from a stdin that is not a terminal, echoed so the output reads as a session."""

    def __init__(self, console: Console) -> None:
        self.console = console

    async def read(self) -> str | None:
        line = await _in_thread(sys.stdin.readline)
        if not line:
            return None
        line = line.rstrip("\r\n")
        self.console.print(Text.assemble(("caller> ", "bold cyan"), line))
        return line


class _TerminalReader(_Reader):
    """Commands typed at a terminal, with readline editing, history and completion."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.readline = _import_readline()
        colour = console.color_system is not None
        # \001 and \002 tell readline the colour codes take no room on the line.
        self._input_prompt = "\001\x1b[1;36m\002caller>\001\x1b[0m\002 " if colour else "caller> "
        self.prompt = self._input_prompt.replace("\001", "").replace("\002", "")
        self.history = _load_history(self.readline) if self.readline else None
        self._terminal = _save_terminal()

    async def read(self) -> str | None:
        self.waiting = True
        try:
            line = await _in_thread(lambda: input(self._input_prompt))
        finally:
            self.waiting = False
        if line is None:
            self.console.print()  # Ctrl-D leaves the cursor after the prompt
        return line

    def typed(self) -> str:
        """What is typed so far after the prompt (to redraw it)."""
        return str(self.readline.get_line_buffer()) if self.readline else ""

    def close(self) -> None:
        if self.readline and self.history:
            with contextlib.suppress(OSError):
                self.readline.set_history_length(1000)
                self.readline.write_history_file(self.history)
        _restore_terminal(self._terminal)


def _import_readline() -> ModuleType | None:
    try:
        import readline
    except ImportError:  # Windows, or a Python built without it: plain input() still works
        return None

    def complete(text: str, state: int) -> str | None:
        if readline.get_begidx() > 0:  # only the command word is completed
            return None
        words = [w for w in [*COMMANDS, "exit"] if w.startswith(text.lower())]
        return f"{words[state]} " if state < len(words) else None

    readline.set_completer(complete)
    readline.set_completer_delims(" ")
    if "libedit" in (readline.__doc__ or ""):
        readline.parse_and_bind("bind ^I rl_complete")
    else:
        readline.parse_and_bind("tab: complete")
    return readline


def _load_history(readline: ModuleType) -> Path | None:
    """The history file, read; ``None`` (no history kept) when it cannot be written."""
    try:
        path = HISTORY_FILE.expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a"):  # creates it, and fails when it cannot be written
            pass
        readline.read_history_file(path)
    except (OSError, RuntimeError):  # RuntimeError: no home directory to expand ~ to
        return None
    return path


def _save_terminal() -> list[Any] | None:
    # After Ctrl-C the input thread is left inside readline with the terminal in its raw
    # mode; the modes saved here are put back on the way out.
    try:
        import termios

        return termios.tcgetattr(sys.stdin.fileno())
    except (ImportError, OSError, ValueError):
        return None


def _restore_terminal(saved: list[Any] | None) -> None:
    if saved is None:
        return
    import termios

    with contextlib.suppress(OSError, ValueError):
        termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)


def _reader(console: Console, lines: AsyncIterator[str] | None) -> _Reader:
    if lines is not None:
        return _LinesReader(lines, console)
    # input() only uses readline when both ends are a terminal.
    if sys.stdin.isatty() and sys.stdout.isatty():
        return _TerminalReader(console)
    return _PipeReader(console)


async def _unreachable(bots: Bots) -> str | None:
    """Why a bot cannot be reached at all, or ``None``. Any HTTP answer will do: GET on the
    messages endpoint is harmless (this bot answers 400, it is the WebSocket upgrade)."""
    for url in bots.urls:
        try:
            timeout = aiohttp.ClientTimeout(total=10)
            async with bots.session.get(url, timeout=timeout) as response:
                await response.read()
        except (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError):
            return f"{url} is not a bot URL (like http://127.0.0.1:3978)"
        except (aiohttp.ClientError, TimeoutError) as e:
            return f"cannot reach the bot at {url}: {str(e) or type(e).__name__}"
    return None


class _Session:
    """One interactive session: the current call, its watcher, and the commands."""

    def __init__(
        self, console: Console, bots: Bots, channel: ChannelStandIn, protocol: Protocol, reader: _Reader
    ) -> None:
        self.console, self.bots, self.channel = console, bots, channel
        self.protocol, self.reader = protocol, reader
        self.call: SimulatedCall | None = None
        self.watcher: asyncio.Task[None] | None = None
        self.busy = False  # a command is in flight: what arrives now is its answer
        self.ringing = False  # a transfer was seen and nothing has settled it yet
        self.ended = False  # the current call's end was sent
        self.reply_keys: set[str] = set()
        self.failure = ""  # why the last action failed

    # --- output -----------------------------------------------------------------

    def emit(self, renderable: Text) -> None:
        """Print, keeping a waiting terminal prompt (and what is typed) below the output."""
        redraw = self.reader.waiting and isinstance(self.reader, _TerminalReader)
        if redraw:
            self.console.file.write("\r\x1b[K")
        self.console.print(renderable)
        if redraw and isinstance(self.reader, _TerminalReader):
            self.console.file.write(self.reader.prompt + self.reader.typed())
            self.console.file.flush()

    def note(self, label: str, text: str, style: str = "bold blue") -> None:
        self.emit(_row(self.console, label, Text(text, style="dim"), style))

    def error(self, text: str) -> None:
        self.emit(_row(self.console, "error", Text(text, style="red"), "bold red"))

    def show(self, activity: dict[str, Any]) -> None:
        """One activity from the bot, for people."""
        tags: list[str] = []
        key = str((activity.get("channelData") or {}).get("replyKey") or "")
        if key and key in self.reply_keys:
            tags.append("sent again, same replyKey")
        self.reply_keys.add(key)
        if not self.busy:
            tags.append("on its own")
        suffix = Text(f"  ({', '.join(tags)})", style="italic yellow") if tags else Text()
        if is_transfer(activity):
            self.ringing = True
            lines = len(transcript_of(activity))
            body = Text.assemble(
                ("TRANSFER", "bold reverse yellow"),
                " to ",
                (target_of(activity) or "(no target)", "bold yellow"),
                "  handoff.initiate with a transcript of ",
                (f"{lines} line{'s' * (lines != 1)}", "bold"),
                suffix,
            )
            self.emit(_row(self.console, "bot", body, "bold green"))
            self.note("", AGENT_HINT)
        elif is_hangup(activity):
            self.ended, self.ringing = True, False
            self.emit(
                _row(self.console, "bot", Text("[the bot hung up]", style="bold") + suffix, "bold green")
            )
            self.note("", "the call has ended: new starts another, quit leaves", "")
        elif activity.get("type") == "message":
            self.ringing = False  # the bot speaks again: whatever transfer there was is settled
            body = Text(f'"{activity.get("text", "")}"')
            voice = voice_of(activity)
            if voice:
                body.append(f"  voice {voice}", style="magenta")
            self.emit(_row(self.console, "bot", body + suffix, "bold green"))
        else:
            self.emit(_row(self.console, "bot", Text(describe(activity)) + suffix, "bold green"))

    def drain(self) -> None:
        """Show what the bot sent on the current call that is not shown yet."""
        if self.call is None:
            return
        for activity in self.call.unread():
            self.call.cursor += 1
            self.show(activity)

    async def watch(self, call: SimulatedCall) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await self.channel.wait_for(call.cursor + 1, call.id, within=3600)
            if call is self.call:
                self.drain()

    # --- the call -------------------------------------------------------------------

    async def send(self, action: Awaitable[None], report: bool = True) -> bool:
        """Run one action on the call; an HTTP error from the bot is shown (``report``) and
        kept in ``failure``, not raised."""
        self.failure = ""
        errors_before = Counter(self.bots.tally.errors)
        self.busy = True
        try:
            await action
            ok = True
        except Mismatch as e:
            ok = False
            new = list(self.bots.tally.errors - errors_before)
            if new and new[0].startswith("HTTP"):
                self.failure = f"the bot answered {', '.join(new)}"
            elif new:
                self.failure = f"no answer from the bot ({', '.join(new)})"
            else:
                self.failure = str(e)
            if report:
                self.error(self.failure)
        finally:
            # Replies come before the bot's HTTP answer: show them under the command.
            self.drain()
            self.busy = False
        return ok

    async def start_call(self, report: bool = True) -> bool:
        await self.stop_watching()
        call = SimulatedCall(self.bots, self.channel, protocol=self.protocol)
        self.call, self.ringing, self.ended = call, False, False
        self.reply_keys.clear()  # reply keys count from 1 on each call
        self.note(
            "call",
            f"{call.id} from {call.caller.number} to {', '.join(self.bots.urls)} "
            f"(protocol {self.protocol}); "
            + (
                "over a streaming socket, the bot replies on it"
                if self.channel.url.startswith("urn:")
                else f"the bot replies to {self.channel.url}"
            ),
            "bold cyan",
        )
        self.watcher = asyncio.create_task(self.watch(call))
        return await self.send(call.start(), report)

    async def stop_watching(self) -> None:
        if self.watcher is not None:
            self.watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.watcher
            self.watcher = None

    async def hang_up(self, why: str) -> None:
        assert self.call is not None
        self.note("caller", why)
        if await self.send(self.call.hang_up()):
            self.ended, self.ringing = True, False

    # --- commands -------------------------------------------------------------------

    async def run(self) -> int:
        try:
            if not await self.start_call(report=False):
                self.console.print(
                    Text(f"error: cannot start a call: {self.failure}", style="red"), soft_wrap=True
                )
                return 1
            self.note("", "type what the caller says, or a command (help lists them)", "")
            while True:
                line = await self.reader.read()
                if line is None or not await self.dispatch(line.strip()):
                    break
            if self.call is not None and not self.ended:
                await self.hang_up("hangs up on the way out: endOfConversation")
        finally:
            await self.stop_watching()
        return 0

    async def dispatch(self, line: str) -> bool:
        """Do one line; ``False`` to leave."""
        if not line:
            return True
        word, _, rest = line.partition(" ")
        word, rest = word.lower(), rest.strip()
        if word in QUIT_WORDS:
            return False
        if word not in COMMANDS:
            word, rest = "say", line
        if word == "help":
            self.help()
        elif word == "new":
            if self.call is not None and not self.ended:
                await self.hang_up("hangs up: endOfConversation")
            await self.start_call()
        elif COMMANDS[word][0] == "" and rest:
            self.error(f"{word} takes nothing; to say it: say {line}")
        elif COMMANDS[word][0].split()[:1] in (["TEXT"], ["DIGITS"], ["STATE"], ["SECONDS"]) and not rest:
            self.error(f"usage: {word} {COMMANDS[word][0]}")
        else:
            if self.ended and word not in ("late", "silence"):
                self.note("", "this call has ended (new starts another); sent all the same", "")
            await self.command(word, rest)
        return True

    async def command(self, word: str, rest: str) -> None:
        call = self.call
        assert call is not None
        if word == "say":
            await self.send(call.say(rest))
        elif word == "press":
            try:
                digits = check_keys(rest.replace(" ", ""))
            except ValueError as e:
                self.error(str(e))
                return
            await self.send(call.press(digits))
        elif word == "silence":
            try:
                seconds = check_silence(float(rest))
            except ValueError:
                self.error(f"silence takes seconds above 0, at most {MAX_SILENCE:g}; not {rest!r}")
                return
            self.note("caller", f"says nothing for {seconds:g} s")
            await call.silence(seconds)  # not send(): what the bot says now, it says on its own
        elif word in ("accept", "fail", "noanswer"):
            await self.agent(word, rest or None)
        elif word == "complete":
            self.note("agent", "hands the caller back: handoff.status completed")
            await self.send(call.agent("complete"))
        elif word == "hangup":
            await self.hang_up("hangs up: endOfConversation")
            if self.ended:
                self.note("", "the call has ended: new starts another, quit leaves", "")
        elif word == "dup":
            last = call.last_sent
            if last is None:
                self.error("nothing was sent yet")
                return
            self.note(
                "channel", f"delivers {last.get('type')} {last.get('id')} again (the bot should ignore it)"
            )
            await self.send(call.redeliver())
        elif word in ("late", "status"):
            state, _, message = rest.partition(" ")
            what = "out of turn" if word == "late" else "from the agent hub"
            self.note("agent", f"handoff.status {state}{f' {message!r}' if message else ''} {what}")
            await self.send(call.status(state, message.strip() or None))

    async def agent(self, word: str, message: str | None) -> None:
        call = self.call
        assert call is not None
        if not self.ringing:
            if word == "noanswer":
                self.note("agent", "no transfer is ringing: nothing to leave unanswered")
                return
            self.note("", "no transfer is ringing; sent all the same (the bot should change nothing)", "")
        if word == "noanswer":
            self.note(
                "agent",
                "the line rings on: the channel keeps redialling and tells the bot nothing; "
                "the bot's no-answer watchdog gives up after transfer.timeout_seconds "
                "and its prompt shows up here by itself",
            )
            return
        if word == "fail":
            message = message or "the agent did not answer"
            self.note("agent", f"the transfer fails: handoff.status failed {message!r}")
            if await self.send(call.agent("fail", message)):
                self.ringing = False
            return
        if self.protocol == "telephony":
            self.note(
                "agent",
                "answers: the channel connects the caller and drops the bot (endOfConversation, no status)",
            )
        else:
            self.note("agent", "answers: handoff.status accepted")
        if await self.send(call.agent("accept")):
            self.ringing = False
            if self.protocol == "telephony":
                self.ended = True
                self.note("", "the call has ended for the bot: new starts another, quit leaves", "")

    def help(self) -> None:
        for word, (args, text) in COMMANDS.items():
            self.emit(_row(self.console, f"{word} {args}".strip(), Text(text), "bold cyan", 24, "<"))


async def run_interactive(
    urls: list[str],
    protocol: Protocol,
    listen: str,
    console: Console,
    lines: AsyncIterator[str] | None = None,
    transport: Transport = "http",
) -> int:
    """One interactive call against the bots; 0 on quit, 1 when no call can be started.

    ``lines`` replaces the keyboard (tests): each item is one typed line.
    """
    if not listen.rpartition(":")[2].isdigit():
        console.print(
            Text(f"error: --listen {listen}: expected HOST:PORT (0: any free port)", style="red"),
            soft_wrap=True,
        )
        return 1
    async with contextlib.AsyncExitStack() as stack:
        try:
            bots, channel = await stack.enter_async_context(wired(urls, listen, transport=transport))
        except OSError as e:  # the port is taken, or the host is not an address of this machine
            console.print(Text(f"error: cannot listen on {listen}: {e}", style="red"), soft_wrap=True)
            return 1
        problem = await _unreachable(bots)
        if problem:
            console.print(Text(f"error: {problem}", style="red"), soft_wrap=True)
            return 1
        reader = _reader(console, lines)
        stack.callback(reader.close)
        return await _Session(console, bots, channel, protocol, reader).run()
