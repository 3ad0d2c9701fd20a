"""The agentic path's reader of code fences: any split of the same model text into chunks gives
the same messages and code."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from aether.core.providers.oi.fences import parse

ANSWERS = {
    "language": (
        "Let me compute that.\n\n```python\nprint(6*7)\n```\n",
        [
            {"type": "message", "content": "Let me compute that.\n\n"},
            {"type": "code", "format": "python", "content": "print(6*7)\n"},
        ],
    ),
    "no language": (
        "Here:\n```\nprint('python', 1)\n```",
        [
            {"type": "message", "content": "Here:\n"},
            {"type": "code", "format": "python", "content": "print('python', 1)\n"},
        ],
    ),
    "two blocks, text after": (
        "First:\n```shell\necho one\n```\nThen:\n```python\nprint(2)\n```\nDone.",
        # The answer ends at the first block's close: it runs, and the model is asked again.
        [
            {"type": "message", "content": "First:\n"},
            {"type": "code", "format": "shell", "content": "echo one\n"},
        ],
    ),
    "inline code and backticks in code": (
        "Use `len` and ``x``:\n````python\ns = '```'\nprint(s)\n````\n",
        [
            {"type": "message", "content": "Use `len` and ``x``:\n"},
            {"type": "code", "format": "python", "content": "s = '```'\nprint(s)\n"},
        ],
    ),
    "line starting with backticks": (
        "`x` is a name.\n``not a fence``\n```js\nconsole.log(1)\n```",
        [
            {"type": "message", "content": "`x` is a name.\n``not a fence``\n"},
            {"type": "code", "format": "js", "content": "console.log(1)\n"},
        ],
    ),
    "unclosed": (
        "Try:\n```python\nx = 1\ny = 2",
        [
            {"type": "message", "content": "Try:\n"},
            {"type": "code", "format": "python", "content": "x = 1\ny = 2"},
        ],
    ),
    "text only": (
        "No code here, just ``` mid-line and a\nnew line.",
        [{"type": "message", "content": "No code here, just ``` mid-line and a\nnew line."}],
    ),
}


def test_a_fence_sent_in_one_chunk_is_not_part_of_the_code() -> None:
    # As servers that batch several tokens per event send it.
    chunks = ["Let me compute that.\n\n", "```python\n", "print(6*7)\n", "```\n"]
    assert parse(chunks) == ANSWERS["language"][1]


def test_each_answer_read_whole_and_a_character_at_a_time() -> None:
    for name, (text, expected) in ANSWERS.items():
        assert parse([text]) == expected, name
        assert parse(list(text)) == expected, name


@st.composite
def split_answer(draw: st.DrawFn) -> tuple[str, list[str]]:
    name = draw(st.sampled_from(sorted(ANSWERS)))
    text = ANSWERS[name][0]
    cuts = sorted(draw(st.sets(st.integers(1, len(text) - 1), max_size=len(text) - 1)))
    bounds = [0, *cuts, len(text)]
    return name, [text[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=400, deadline=None)
@given(split_answer())
def test_any_split_of_an_answer_gives_the_same_blocks(case: tuple[str, list[str]]) -> None:
    name, chunks = case
    assert parse(chunks) == ANSWERS[name][1]
