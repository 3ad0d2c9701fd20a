from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Iterator

import pytest
import trio

from aether.testing.fake_llm import Behaviour, FakeLLM
from aether.testing.postgres_server import PostgresServer, postgres_available
from aether.testing.redis_server import RedisServer
from aether.ws import hub
from tests.helpers import fresh_db_path
from tests.history_backends import HistoryBackend, PostgresBackend, SQLiteBackend
from tests.protocol_check import ProtocolCheck


@pytest.fixture
async def fake_llm(nursery: trio.Nursery) -> AsyncIterator[FakeLLM]:
    """The fake OpenAI-compatible upstream on 127.0.0.1 (a real HTTP server), stopped after."""
    fake = FakeLLM(Behaviour(tokens=20, delay_s=0.01))
    await nursery.start(fake.serve)
    return fake


@pytest.fixture(autouse=True)
def server_messages_match_the_protocol(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """Every message the server sends over a WebSocket in this test must be one the AsyncAPI
    document describes (``tests/protocol_check.py``)."""
    if request.node.get_closest_marker("synthetic_messages") is not None:
        yield
        return
    check = ProtocolCheck(hub.encode)
    monkeypatch.setattr(hub, "encode", check)
    yield
    assert check.undescribed == [], "messages the AsyncAPI document does not describe"


@pytest.fixture
def collect_garbage_after() -> Iterator[None]:
    """Leave no garbage for the next test (used by the agentic path's tests). After Open
    Interpreter's tests, the next test's app creation (Werkzeug compiles routes with
    ``ast.parse``) failed now and then with CPython 3.11.7's "AST constructor recursion depth
    mismatch" SystemError: about one run in two of those two files together, none in six with
    a collection in between. The likely cause is the collector running their finalizers in the
    middle of ``ast.parse``."""
    yield
    gc.collect()


@pytest.fixture
async def redis(nursery: trio.Nursery) -> RedisServer:
    """A real redis-server on a free loopback port (empty, no persistence), stopped after."""
    server = RedisServer()
    await nursery.start(server.run)
    return server


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the test session (each test takes a database of its
    own), on a free loopback port, stopped and removed after."""
    if not postgres_available():
        pytest.skip("PostgreSQL is not installed (scripts/test installs it)")
    server = PostgresServer()
    server.start()
    yield server
    server.close()


@pytest.fixture
def postgres(postgres_cluster: PostgresServer) -> PostgresBackend:
    """A new, empty PostgreSQL database."""
    return PostgresBackend(postgres_cluster.create_database())


@pytest.fixture(params=["sqlite", "postgresql"])
def history_backend(request: pytest.FixtureRequest) -> HistoryBackend:
    """Each history store in turn, on a new database: the tests that take it hold for both."""
    if request.param == "sqlite":
        return SQLiteBackend(fresh_db_path())
    backend: PostgresBackend = request.getfixturevalue("postgres")
    return backend
