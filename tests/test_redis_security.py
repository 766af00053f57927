"""Redis over TLS and with ACL users: servers of the tests' own, on free loopback ports,
with certificates the tests make, and the users docs/redis-security.md tells you to create."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from click.testing import CliRunner
from redis.asyncio import Redis

from adapters.connections import Connections, NotConnected
from adapters.framing import Request, new_id
from adapters.inspector import CallInspector
from adapters.keys import Keyspace
from adapters.redis_client import connection_problem, create_redis, security_options
from adapters.store import RedisCallStore
from cli import cli
from orchestrator.callflow import load_callflow
from orchestrator.config import Settings, load_settings, redact_url
from orchestrator.engine import Engine
from orchestrator.errors import ConfigError, StoreUnavailable
from orchestrator.events import CallerInput, HandoffStatus
from states import State
from tests.conftest import SAMPLE_FLOW
from tests.servers import TlsFiles, TlsRedisServer

DOC = Path(__file__).parent.parent / "docs" / "redis-security.md"
PASSWORDS = {
    "cc-bot": "bot-pw-3f9a1c",
    "cc-operator": "op-pw-77d2e0",
    "cc-operator-strict": "op-pw-strict-91",
}
ADMIN_PASSWORD = "admin-pw-5b8e"
# The tests' own set-up (users, calls written as the bot, clean-up): nothing there is
# under test, so its Redis timeouts are generous rather than the product's 5 s default.
SETUP_TIMEOUT_SECONDS = 14.0  # REDIS_TIMEOUT_SECONDS' maximum
SECURITY_SETTINGS = (
    "REDIS_URL",
    "REDIS_USERNAME",
    "REDIS_PASSWORD",
    "REDIS_TLS_CA_FILE",
    "REDIS_TLS_CERT_FILE",
    "REDIS_TLS_KEY_FILE",
    "REDIS_TLS_CHECK_HOSTNAME",
    "REDIS_KEY_PREFIX",
    "CALL_IDLE_TTL_SECONDS",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither the bot's nor the CLI's settings come from the machine's environment."""
    for name in SECURITY_SETTINGS:
        monkeypatch.delenv(name, raising=False)


def documented_users(prefix: str) -> list[list[str]]:
    """The doc's ``ACL SETUSER`` lines, for this prefix and the tests' passwords."""
    lines = [line for line in DOC.read_text(encoding="utf-8").splitlines() if line.startswith("ACL SETUSER")]
    assert {shlex.split(line)[2] for line in lines} == set(PASSWORDS)
    users = []
    for line in lines:
        words = shlex.split(line)
        words = [
            f">{PASSWORDS[words[2]]}" if w.startswith("><") else w.replace("~cc:", f"~{prefix}:")
            for w in words
        ]
        users.append(words)
    return users


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return TlsFiles.make(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def secure_redis(tmp_path_factory: pytest.TempPathFactory, tls: TlsFiles) -> Iterator[TlsRedisServer]:
    """TLS only, and no login without a password: the default user is off."""
    server = TlsRedisServer(tmp_path_factory.mktemp("secure-redis"), tls, "no").start()
    try:
        admin = tls_client(server)
        for words in documented_users("cc"):
            admin.execute_command(*words)  # type: ignore[no-untyped-call]
        admin.execute_command("ACL", "SETUSER", "admin", "on", f">{ADMIN_PASSWORD}", "~*", "&*", "+@all")  # type: ignore[no-untyped-call]
        admin.execute_command("ACL", "SETUSER", "default", "off")  # type: ignore[no-untyped-call]
        admin.close()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def mtls_redis(tmp_path_factory: pytest.TempPathFactory, tls: TlsFiles) -> Iterator[TlsRedisServer]:
    """TLS, and every client must show a certificate signed by the test CA."""
    server = TlsRedisServer(tmp_path_factory.mktemp("mtls-redis"), tls, "yes").start()
    try:
        yield server
    finally:
        server.stop()


def admin_of(server: TlsRedisServer) -> redis.Redis:
    return tls_client(server, username="admin", password=ADMIN_PASSWORD, decode_responses=True)


def tls_client(server: TlsRedisServer, **options: Any) -> redis.Redis:
    """A synchronous client with the test CA's client certificate, for setting up and
    checking. Not ``server.admin()``: its 1 s timeout suits a readiness poll, but a loaded
    2-core machine can stall a TLS handshake longer, and the set-up is not what is tested."""
    tls = server.tls
    return redis.Redis(
        port=server.port,
        ssl=True,
        ssl_ca_certs=str(tls.ca),
        ssl_certfile=str(tls.client_cert),
        ssl_keyfile=str(tls.client_key),
        socket_timeout=SETUP_TIMEOUT_SECONDS,
        **options,
    )


def settings_for(server: TlsRedisServer, user: str | None = None, **more: Any) -> Settings:
    if user is not None:
        more = {"REDIS_USERNAME": user, "REDIS_PASSWORD": PASSWORDS[user], **more}
    return load_settings(**{"REDIS_URL": server.url, "REDIS_TLS_CA_FILE": server.tls.ca, **more})


def cli_options(server: TlsRedisServer, user: str, prefix: str) -> list[str]:
    return [
        *("--redis-url", server.url, "--prefix", prefix),
        *("--redis-username", user, "--redis-password", PASSWORDS[user]),
        *("--redis-tls-ca-file", str(server.tls.ca)),
    ]


async def write_calls(settings: Settings, prefix: str) -> None:
    """What a bot does: a call that is transferring and one whose transfer failed."""
    client = create_redis(settings)
    try:
        engine = Engine(RedisCallStore(client, Keyspace(prefix)), load_callflow(SAMPLE_FLOW))
        await engine.handle("call-1", CallerInput("hello"), activity_id="a1")
        await engine.handle("call-1", CallerInput("agent"), activity_id="a2", reference='{"x": 1}')
        await engine.handle("call-2", CallerInput("agent"), activity_id="b1", reference='{"x": 2}')
        await engine.handle("call-2", HandoffStatus("failed", "busy"), activity_id="b2")
    finally:
        await client.aclose()


# --- TLS ---------------------------------------------------------------------------


async def test_the_bot_store_round_trip_over_tls_as_the_documented_bot_user(
    secure_redis: TlsRedisServer, key_prefix: str
) -> None:
    settings = settings_for(secure_redis, "cc-bot")
    await write_calls(settings, "cc")
    client = create_redis(settings)
    try:
        assert await connection_problem(client, settings) is None
        store = RedisCallStore(client, Keyspace("cc"))
        assert (await store.record("call-1"))["state"] == "transferring"
        loaded = await store.load("call-2")
        assert loaded.call is not None and loaded.call.state == "failed" and loaded.call.failure == "busy"
        # Every script the scheduler and reconcile run, allowed by the bot's ACL.
        items = await store.claim_due(10, 1000)
        await store.release(items, 1000)
        await store.reschedule_timer("call-1")
        assert await store.prune_index() == 0
        # The streaming sockets' routing: an inbox of its own, publishing to another's.
        connections = Connections(store)
        serving = asyncio.create_task(connections.run())
        try:
            async with asyncio.timeout(SETUP_TIMEOUT_SECONDS):
                inbox = connections.keys.inbox(connections.instance)
                while not await client.spublish(inbox, "{}"):  # noqa: ASYNC110 - until it subscribed
                    await asyncio.sleep(0.05)
            await client.set(connections.keys.socket("call-1"), "gone-instance", ex=60)
            with pytest.raises(NotConnected):
                await connections.send(
                    "call-1", Request(new_id(), "POST", "/v3/conversations/call-1/activities")
                )
        finally:
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
    finally:
        await client.aclose()


async def test_a_wrong_ca_fails_at_once_and_says_it_is_tls(secure_redis: TlsRedisServer) -> None:
    settings = settings_for(secure_redis, "cc-bot", REDIS_TLS_CA_FILE=secure_redis.tls.other_ca)
    client = create_redis(settings)
    try:
        # It fails rather than hangs: the refusal is the handshake's own verdict, not a
        # timeout (a hang would end in "not reachable (TimeoutError)", or the test timeout).
        problem = await connection_problem(client, settings)
        assert problem is not None and "TLS handshake" in problem and "REDIS_TLS_CA_FILE" in problem
        assert "CERTIFICATE_VERIFY_FAILED" in problem and "not reachable" not in problem
        with pytest.raises(StoreUnavailable) as info:
            await RedisCallStore(client, Keyspace("cc")).record("call-1")
        assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)
        assert not any(isinstance(e, TimeoutError) for e in _chain(info.value))
    finally:
        await client.aclose()


async def test_the_system_cas_do_not_know_a_private_ca(secure_redis: TlsRedisServer) -> None:
    settings = load_settings(
        REDIS_URL=secure_redis.url, REDIS_USERNAME="cc-bot", REDIS_PASSWORD=PASSWORDS["cc-bot"]
    )
    client = create_redis(settings)
    try:
        problem = await connection_problem(client, settings)
        assert problem is not None and "TLS handshake" in problem
    finally:
        await client.aclose()


async def test_a_server_that_wants_client_certificates(mtls_redis: TlsRedisServer) -> None:
    tls = mtls_redis.tls
    settings = settings_for(
        mtls_redis, REDIS_TLS_CERT_FILE=tls.client_cert, REDIS_TLS_KEY_FILE=tls.client_key
    )
    client = create_redis(settings)
    assert await connection_problem(client, settings) is None
    await client.aclose()

    without = settings_for(mtls_redis)
    client = create_redis(without)
    try:
        # Refused by the server, not timed out (see the wrong-CA test). TLS 1.3 checks the
        # client's certificate after the handshake, so the server's CERTIFICATE_REQUIRED
        # alert races its close: now and then the client sees only the reset.
        problem = await connection_problem(client, without)
        assert problem is not None and "REDIS_TLS_CERT_FILE" in problem and "not reachable" not in problem
        assert ("TLS handshake" in problem and "CERTIFICATE_REQUIRED" in problem) or (
            "cut off the TLS connection" in problem and "reset" in problem
        ), problem
    finally:
        await client.aclose()


class _Failing:
    """A client whose PING fails with ``error``, as redis-py raises it."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    async def ping(self) -> bool:
        raise self.error


async def test_a_reset_over_tls_points_to_the_client_certificate(tls: TlsFiles) -> None:
    try:
        try:
            raise ConnectionResetError(104, "Connection reset by peer")
        except OSError as e:  # what redis-py's reader does with it (no "from")
            raise redis.exceptions.ConnectionError(f"Error while reading from h:1 : {e.args}")  # noqa: B904
    except redis.exceptions.ConnectionError as e:
        reset = e
    over_tls = load_settings(REDIS_URL="rediss://127.0.0.1:1/0", REDIS_TLS_CA_FILE=tls.ca)
    problem = await connection_problem(cast(Redis, _Failing(reset)), over_tls)
    assert problem is not None and problem.startswith("Redis cut off the TLS connection")
    assert "REDIS_TLS_CERT_FILE" in problem and "Connection reset by peer" in problem
    plain = load_settings(REDIS_URL="redis://127.0.0.1:1/0")
    problem = await connection_problem(cast(Redis, _Failing(reset)), plain)
    assert problem is not None and problem.startswith("Redis is not reachable")
    refused = redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused.")
    problem = await connection_problem(cast(Redis, _Failing(refused)), over_tls)
    assert problem is not None and problem.startswith("Redis is not reachable")


def test_the_host_name_check_is_on_unless_turned_off(tls: TlsFiles) -> None:
    url = "rediss://redis.internal:6380/0"
    assert security_options(load_settings(REDIS_URL=url))["ssl_check_hostname"] is True
    options = security_options(
        load_settings(REDIS_URL=url, REDIS_TLS_CA_FILE=tls.ca, REDIS_TLS_CHECK_HOSTNAME="0")
    )
    assert options == {"ssl_check_hostname": False, "ssl_ca_certs": str(tls.ca)}
    assert security_options(load_settings(REDIS_URL="redis://h:6379/0")) == {}


async def test_the_client_verifies_what_the_settings_say_and_no_url_can_say_otherwise(tls: TlsFiles) -> None:
    # Why a URL's ssl_* options are refused: redis-py lets them win over the arguments.
    sneaky = Redis.from_url(
        "rediss://h/0?ssl_cert_reqs=none&ssl_check_hostname=false", ssl_check_hostname=True
    )
    assert sneaky.connection_pool.connection_kwargs["ssl_cert_reqs"] == "none"
    assert sneaky.connection_pool.connection_kwargs["ssl_check_hostname"] is False
    await sneaky.aclose()
    for url in ("rediss://h/0?ssl_cert_reqs=none", "rediss://h/0?ssl_check_hostname=false"):
        with pytest.raises(ConfigError) as info:
            load_settings(REDIS_URL=url, REDIS_TLS_CA_FILE=tls.ca)
        assert info.value.where == "REDIS_URL" and "REDIS_TLS_CHECK_HOSTNAME" in str(info.value)
    # What the accepted settings give the connections: verification on, the host checked.
    for check_hostname in ("1", "0"):
        settings = load_settings(
            REDIS_URL="rediss://h:6380/0?db=0",
            REDIS_TLS_CA_FILE=tls.ca,
            REDIS_TLS_CHECK_HOSTNAME=check_hostname,
        )
        client = create_redis(settings)
        assert isinstance(client, Redis)
        kwargs = client.connection_pool.connection_kwargs
        assert kwargs.get("ssl_cert_reqs", "required") == "required"
        assert kwargs["ssl_check_hostname"] is (check_hostname == "1")
        assert kwargs["ssl_ca_certs"] == str(tls.ca)
        await client.aclose()


# --- AUTH and ACL users -------------------------------------------------------------


async def test_a_wrong_password_is_named_as_such_and_never_shown(secure_redis: TlsRedisServer) -> None:
    wrong = "not-the-password-1234"
    settings = settings_for(secure_redis, REDIS_USERNAME="cc-bot", REDIS_PASSWORD=wrong)
    client = create_redis(settings)
    try:
        problem = await connection_problem(client, settings)
        assert problem is not None
        assert "'cc-bot'" in problem and "REDIS_USERNAME" in problem and "REDIS_PASSWORD" in problem
        store = RedisCallStore(client, Keyspace("cc"))
        assert not await store.ping()
        with pytest.raises(StoreUnavailable) as info:
            await store.record("call-1")
        assert wrong not in problem and wrong not in str(info.value)
        assert wrong not in repr(settings) and wrong not in str(settings)
    finally:
        await client.aclose()


async def test_no_password_for_a_server_that_wants_one(secure_redis: TlsRedisServer) -> None:
    settings = settings_for(secure_redis)
    client = create_redis(settings)
    try:
        problem = await connection_problem(client, settings)
        assert problem is not None and "user 'default'" in problem and "REDIS_PASSWORD" in problem
    finally:
        await client.aclose()


def test_the_password_may_be_in_the_url_and_is_masked(secure_redis: TlsRedisServer) -> None:
    password = PASSWORDS["cc-bot"]
    url = secure_redis.url.replace("rediss://", f"rediss://cc-bot:{password}@")
    settings = load_settings(REDIS_URL=url, REDIS_TLS_CA_FILE=secure_redis.tls.ca)
    assert password not in repr(settings) and "cc-bot:***@" in repr(settings)

    async def check() -> str | None:
        client = create_redis(settings)
        try:
            return await connection_problem(client, settings)
        finally:
            await client.aclose()

    assert asyncio.run(check()) is None
    wrong = url.replace(password, "wrong-pw-000")
    result = CliRunner().invoke(
        cli, ["--redis-url", wrong, "--redis-tls-ca-file", str(secure_redis.tls.ca), "calls", "list"]
    )
    assert result.exit_code == 1 and "wrong-pw-000" not in result.output
    assert result.output.startswith(
        f"error: Redis at {redact_url(wrong)}: Redis refused to log in user 'cc-bot'"
    )


@pytest.fixture
def calls_by_the_bot(secure_redis: TlsRedisServer, key_prefix: str) -> Iterator[str]:
    """Calls under a prefix of this test's own, written as the bot user (the ACL lines
    are applied again for that prefix), deleted afterwards."""
    admin = admin_of(secure_redis)
    try:
        for words in documented_users(key_prefix):
            admin.execute_command(*words)  # type: ignore[no-untyped-call]
        writer = settings_for(secure_redis, "cc-bot", REDIS_TIMEOUT_SECONDS=SETUP_TIMEOUT_SECONDS)
        asyncio.run(write_calls(writer, key_prefix))
        yield key_prefix
    finally:  # also when the set-up failed half-way: no keys, grant or socket left behind
        try:
            for key in admin.scan_iter(match=f"{key_prefix}:*"):
                admin.delete(key)
            for words in documented_users("cc"):
                admin.execute_command(*words)  # type: ignore[no-untyped-call]
        finally:
            admin.close()


@pytest.mark.parametrize("user", ["cc-operator", "cc-operator-strict"])
def test_the_read_only_operator_can_run_every_read_command(
    secure_redis: TlsRedisServer, calls_by_the_bot: str, user: str
) -> None:
    base = cli_options(secure_redis, user, calls_by_the_bot)
    rows = json.loads(_ok(base, "calls", "list", "--json"))
    assert sorted((r["id"], r["state"]) for r in rows) == [("call-1", "transferring"), ("call-2", "failed")]
    call = json.loads(_ok(base, "calls", "show", "call-2", "--json"))
    assert call["record"]["failure"] == "busy" and [
        s["to"] for s in call["history"] if s["trigger"] != "move"
    ] == [
        "transferring",
        "failed",
    ]
    figures = json.loads(_ok(base, "stats", "--json"))
    assert figures["calls"]["failed"] == 1 and figures["transfers"]["started"] == 2
    assert "transferring" in _ok(base, "diagram", "--call", "call-1")

    async def follow() -> None:  # what `calls watch` reads: XREVRANGE, then XREAD
        settings = settings_for(secure_redis, user)
        client = create_redis(settings)
        try:
            inspector = CallInspector(RedisCallStore(client, Keyspace(calls_by_the_bot)))
            heads = await inspector.feed_heads()
            steps = await inspector.feed_since(["0-0"] * len(heads))
            assert sorted(step.trigger for step in steps).count("move") == 2  # one per call
            assert len(steps) == 5
        finally:
            await client.aclose()

    asyncio.run(follow())


def test_the_operator_settings_also_come_from_the_environment(
    secure_redis: TlsRedisServer, calls_by_the_bot: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", secure_redis.url)
    monkeypatch.setenv("REDIS_KEY_PREFIX", calls_by_the_bot)
    monkeypatch.setenv("REDIS_USERNAME", "cc-operator")
    monkeypatch.setenv("REDIS_PASSWORD", PASSWORDS["cc-operator"])
    monkeypatch.setenv("REDIS_TLS_CA_FILE", str(secure_redis.tls.ca))
    assert [r["id"] for r in json.loads(_ok([], "calls", "list", "--state", "failed", "--json"))] == [
        "call-2"
    ]


@pytest.mark.parametrize(
    ("user", "command"), [("cc-operator", "SCRIPT EXISTS"), ("cc-operator-strict", "ZRANGEBYSCORE")]
)
def test_the_read_only_operator_cannot_reconcile_but_the_bot_can(
    secure_redis: TlsRedisServer,
    calls_by_the_bot: str,
    monkeypatch: pytest.MonkeyPatch,
    user: str,
    command: str,
) -> None:
    # call-1 expires without ending: its index entry is left for reconcile to drop. The
    # entry is dated back past the idle TTL rather than waited on: no sleep, no clock race.
    keys = Keyspace(calls_by_the_bot)
    admin = admin_of(secure_redis)
    admin.delete(keys.call("call-1").call)
    shard = keys.locate("call-1")[0]
    backdated = []
    for state in State:
        index = keys.state_index(shard, state.value)
        since = admin.zscore(index, "call-1")
        if since is not None:
            admin.zadd(index, {"call-1": float(since) - 60_000}, xx=True)
            backdated.append(state.value)
    admin.close()
    assert backdated == ["transferring"]
    monkeypatch.setenv("CALL_IDLE_TTL_SECONDS", "1")  # what reconcile takes as expired
    result = CliRunner().invoke(cli, [*cli_options(secure_redis, user, calls_by_the_bot), "reconcile"])
    assert result.exit_code == 1 and result.exception is not None and isinstance(result.exception, SystemExit)
    assert result.output.splitlines() == [
        f"error: Redis user {user!r} is not allowed to run {command} (NOPERM): "
        "a read-only user can inspect calls but not change them"
    ]
    bot = _ok(cli_options(secure_redis, "cc-bot", calls_by_the_bot), "reconcile")
    assert bot.strip() == "removed 1 index entries of expired calls"


@pytest.mark.parametrize("user", ["cc-operator", "cc-operator-strict"])
async def test_the_read_only_operator_cannot_write_or_read_beyond_its_prefix(
    secure_redis: TlsRedisServer, user: str
) -> None:
    settings = settings_for(secure_redis, user)
    client = create_redis(settings)
    call = Keyspace("cc").call("call-1").call
    try:
        for attempt in (
            client.set("cc:x", "1"),
            client.hset(call, "state", "ended"),
            client.delete(call),
            client.expire(call, 1),
            client.hgetall("other:secret"),
            client.flushall(),
            client.eval("return 1", 0),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                await attempt
    finally:
        await client.aclose()


async def test_the_bot_user_is_confined_to_its_prefix(secure_redis: TlsRedisServer) -> None:
    settings = settings_for(secure_redis, "cc-bot")
    client = create_redis(settings)
    try:
        for attempt in (client.set("other:x", "1"), client.flushall(), client.flushdb(), client.keys("*")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                await attempt
    finally:
        await client.aclose()


def _chain(error: BaseException | None) -> Iterator[BaseException]:
    """``error`` and what caused it, outermost first (a chain, not a cycle: bounded)."""
    for _ in range(16):
        if error is None:
            return
        yield error
        error = error.__cause__ or error.__context__


def _ok(base: list[str], *args: str) -> str:
    result = CliRunner().invoke(cli, [*base, *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


# --- configuration ------------------------------------------------------------------


@pytest.fixture
def pem(tmp_path: Path) -> Path:
    path = tmp_path / "some.pem"
    path.write_text("-----BEGIN CERTIFICATE-----\n", encoding="ascii")
    return path


@pytest.mark.parametrize(
    ("env", "named", "says"),
    [
        (
            {"REDIS_URL": "rediss://h", "REDIS_TLS_CA_FILE": "/nonexistent.pem"},
            "REDIS_TLS_CA_FILE",
            "no such file",
        ),
        (
            {"REDIS_URL": "rediss://h", "REDIS_TLS_CERT_FILE": "/nope.crt"},
            "REDIS_TLS_CERT_FILE",
            "no such file",
        ),
        (
            {"REDIS_URL": "rediss://h", "REDIS_TLS_KEY_FILE": "/nope.key"},
            "REDIS_TLS_KEY_FILE",
            "no such file",
        ),
        ({"REDIS_URL": "redis://h", "REDIS_TLS_CA_FILE": "PEM"}, "REDIS_TLS_CA_FILE", "rediss://"),
        ({"REDIS_TLS_CA_FILE": "PEM"}, "REDIS_TLS_CA_FILE", "rediss://"),
        (
            {"REDIS_URL": "unix:///tmp/r.sock", "REDIS_TLS_CERT_FILE": "PEM"},
            "REDIS_TLS_CERT_FILE",
            "rediss://",
        ),
        (
            {"REDIS_URL": "redis://h", "REDIS_TLS_CHECK_HOSTNAME": "0"},
            "REDIS_TLS_CHECK_HOSTNAME",
            "rediss://",
        ),
        (
            {"REDIS_URL": "rediss://h", "REDIS_TLS_CHECK_HOSTNAME": "maybe"},
            "REDIS_TLS_CHECK_HOSTNAME",
            "bool",
        ),
        (
            {"REDIS_URL": "rediss://h", "REDIS_TLS_CERT_FILE": "PEM"},
            "REDIS_TLS_KEY_FILE",
            "REDIS_TLS_CERT_FILE",
        ),
        (
            {"REDIS_URL": "rediss://h", "REDIS_TLS_KEY_FILE": "PEM"},
            "REDIS_TLS_CERT_FILE",
            "REDIS_TLS_KEY_FILE",
        ),
        ({"REDIS_USERNAME": "cc-bot", "REDIS_PASSWORD": "pw-secret-1"}, "REDIS_USERNAME", "needs REDIS_URL"),
        ({"REDIS_PASSWORD": "pw-secret-1"}, "REDIS_PASSWORD", "needs REDIS_URL"),
        ({"REDIS_URL": "redis://h", "REDIS_USERNAME": "cc-bot"}, "REDIS_PASSWORD", "required"),
        ({"REDIS_URL": "redis://u@h", "REDIS_USERNAME": "cc-bot"}, "REDIS_USERNAME", "one place"),
        (
            {"REDIS_URL": "redis://:pw-secret-2@h", "REDIS_PASSWORD": "pw-secret-1"},
            "REDIS_PASSWORD",
            "one place",
        ),
        (
            {"REDIS_URL": "redis://h?password=pw-secret-2", "REDIS_PASSWORD": "pw-secret-1"},
            "REDIS_PASSWORD",
            "one place",
        ),
        # redis-py lets a URL's ssl_* options win over the REDIS_TLS_* settings: refused.
        *(
            ({"REDIS_URL": url, **more}, "REDIS_URL", says)
            for url, more, says in [
                ("rediss://h/0?ssl_cert_reqs=none", {}, "(ssl_cert_reqs)"),
                ("rediss://h/0?ssl_cert_reqs=required", {}, "(ssl_cert_reqs)"),
                (
                    "rediss://h/0?ssl_check_hostname=false",
                    {"REDIS_TLS_CHECK_HOSTNAME": "1"},
                    "(ssl_check_hostname)",
                ),
                (
                    "rediss://h/0?ssl_check_hostname=true",
                    {"REDIS_TLS_CHECK_HOSTNAME": "0"},
                    "REDIS_TLS_CHECK_HOSTNAME",
                ),
                ("rediss://h/0?ssl_ca_certs=/etc/ssl/certs/ca.pem", {}, "REDIS_TLS_CA_FILE"),
                ("rediss://h/0?ssl_ca_path=/etc/ssl/certs", {}, "(ssl_ca_path)"),
                ("rediss://h/0?ssl_certfile=/c.crt&ssl_keyfile=/c.key", {}, "(ssl_certfile, ssl_keyfile)"),
                ("rediss://h/0?ssl_password=pw-secret-3", {}, "(ssl_password)"),
                ("rediss://h/0?ssl_min_version=2", {}, "(ssl_min_version)"),
                (
                    "rediss://h/0?ssl_include_verify_flags=VERIFY_X509_PARTIAL_CHAIN",
                    {},
                    "(ssl_include_verify_flags)",
                ),
                ("rediss://h/0?ssl_cert_reqs", {}, "(ssl_cert_reqs)"),  # no value: still refused
                ("rediss://h/0?SSL_CERT_REQS=none", {}, "(SSL_CERT_REQS)"),
                ("rediss://h/0?%73sl_cert_reqs=none", {}, "(ssl_cert_reqs)"),  # percent-encoded
                ("rediss://h/0?db=1&ssl_cert_reqs=none&ssl_cert_reqs=none", {}, "(ssl_cert_reqs)"),
                (
                    "rediss://cc-bot:pw-secret-2@h/0?ssl_cert_reqs=none",
                    {},
                    "verification cannot be turned off",
                ),
                ("rediss://h/0?password=pw-secret-2&ssl_cert_reqs=none", {}, "may not be set in the URL"),
                ("redis://h/0?ssl_cert_reqs=none", {}, "(ssl_cert_reqs)"),
                ("unix:///run/redis.sock?ssl_check_hostname=false", {}, "(ssl_check_hostname)"),
            ]
        ),
    ],
)
def test_each_bad_setting_is_named_and_no_password_is_echoed(
    monkeypatch: pytest.MonkeyPatch, pem: Path, env: dict[str, str], named: str, says: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, str(pem) if value == "PEM" else value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert info.value.where == named and says in message and "\n" not in message
    assert "pw-secret" not in message


def test_good_settings_and_what_they_show(monkeypatch: pytest.MonkeyPatch, tls: TlsFiles) -> None:
    monkeypatch.setenv("REDIS_URL", "rediss://redis.internal:6380/0")
    monkeypatch.setenv("REDIS_USERNAME", "cc-bot")
    monkeypatch.setenv("REDIS_PASSWORD", "pw-secret-in-env")
    monkeypatch.setenv("REDIS_TLS_CA_FILE", str(tls.ca))
    monkeypatch.setenv("REDIS_TLS_CERT_FILE", str(tls.client_cert))
    monkeypatch.setenv("REDIS_TLS_KEY_FILE", str(tls.client_key))
    settings = load_settings()
    assert (
        settings.REDIS_PASSWORD is not None
        and settings.REDIS_PASSWORD.get_secret_value() == "pw-secret-in-env"
    )
    assert "pw-secret" not in repr(settings) and "pw-secret" not in str(settings)
    assert security_options(settings) == {
        "username": "cc-bot",
        "password": "pw-secret-in-env",
        "ssl_check_hostname": True,
        "ssl_ca_certs": str(tls.ca),
        "ssl_certfile": str(tls.client_cert),
        "ssl_keyfile": str(tls.client_key),
    }


def test_defaults_and_empty_values_are_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    assert (settings.REDIS_USERNAME, settings.REDIS_PASSWORD, settings.REDIS_TLS_CA_FILE) == (
        None,
        None,
        None,
    )
    assert (settings.REDIS_TLS_CERT_FILE, settings.REDIS_TLS_KEY_FILE) == (None, None)
    assert settings.REDIS_TLS_CHECK_HOSTNAME is True
    monkeypatch.setenv("REDIS_USERNAME", "")
    monkeypatch.setenv("REDIS_PASSWORD", "")
    assert load_settings().REDIS_PASSWORD is None


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("rediss://cc-bot:s3cr%40t@h:6380/0", "rediss://cc-bot:***@h:6380/0"),
        ("redis://:s3cret@h", "redis://:***@h"),
        ("unix:///run/redis.sock?db=1&password=s3cret", "unix:///run/redis.sock?db=1&password=***"),
    ],
)
def test_urls_are_shown_without_their_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert re.search("s3cr", repr(load_settings(REDIS_URL=url))) is None
