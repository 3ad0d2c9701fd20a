from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from aether.testing.fake_llm import Behaviour, FakeLLM


@pytest.fixture
async def fake_llm(nursery: trio.Nursery) -> AsyncIterator[FakeLLM]:
    """The fake OpenAI-compatible upstream on 127.0.0.1 (a real HTTP server), stopped after."""
    fake = FakeLLM(Behaviour(tokens=20, delay_s=0.01))
    await nursery.start(fake.serve)
    return fake
