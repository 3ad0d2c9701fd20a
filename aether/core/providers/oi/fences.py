"""FenceParser: a model's text answer as Open Interpreter's messages and code, however the
upstream cut it into chunks.

Without function calling, Open Interpreter reads code from the model's markdown fences. Its own
reader (``interpreter.core.llm.run_text_llm``, 0.4.3) works only when the fence arrives a token
at a time: a chunk holding a whole fence line (``"```python\\n"``, as servers that send several
tokens per event do) makes it propose ``"```\\nprint(6*7)\\n"`` as the code, a SyntaxError once
approved. It also deletes the language's name wherever it appears in the code
(``print("python")`` becomes ``print("")``) and takes text before a fence in the same chunk for
code. This reader decides on whole lines instead, so any split of the same text gives the same
blocks:

- a fence is a line that starts with three or more backticks; the rest of that line names the
  language (its first word; none: ``python``, as Open Interpreter assumes);
- the code is every line up to a line that starts with as many backticks or more; the answer
  ends there, as Open Interpreter's does (it runs the code, then asks the model again);
- text outside fences is the message, sent as it arrives, except a line's first backticks,
  held until the line shows whether it is a fence.

``run_text_llm`` is Open Interpreter's function with this reader inside (installed over its own
by the interpreter manager).

@.architecture
role: code fence parser
jobs: [stream_generation, validation]
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

FENCE = "```"
DEFAULT_LANGUAGE = "python"

Piece = dict[str, str]


class FenceParser:
    def __init__(self) -> None:
        self._held = ""  # the start of a line that may be a fence, or a fence line not yet whole
        self._at_line_start = True
        self._fence: str | None = None  # the opening fence while inside a code block
        self._language = DEFAULT_LANGUAGE
        self.done = False  # the code block closed: the answer ends here

    def feed(self, text: str) -> list[Piece]:
        """The messages and code that ``text`` (the next chunk) completes."""
        pieces: list[Piece] = []
        text = self._held + text
        self._held = ""
        while text and not self.done:
            if self._at_line_start and text.startswith("`"):
                line_end = text.find("\n")
                decided = self._line_start(text if line_end < 0 else text[: line_end + 1])
                if decided is None:  # a fence or not: the rest of the line will tell
                    self._held = text
                    break
                piece, used = decided
                if piece is not None:
                    pieces.append(piece)
                text = text[used:]
                continue
            line_end = text.find("\n")
            if line_end < 0:
                # Within a line: all of it is content, up to a backtick that might open a fence
                # only if it begins a line, which it does not here.
                pieces.append(self._content(text))
                self._at_line_start = False
                break
            pieces.append(self._content(text[: line_end + 1]))
            self._at_line_start = True
            text = text[line_end + 1 :]
        return _merged(pieces)

    def close(self) -> list[Piece]:
        """The end of the answer: what is still held is content as it stands, except a closing
        fence without its newline (models often end with one)."""
        held, self._held = self._held, ""
        if not held or self.done:
            return []
        if self._fence is not None and self._closes(held):
            self.done = True
            return []
        return [self._content(held)]

    def _line_start(self, line: str) -> tuple[Piece | None, int] | None:
        """A line that starts with a backtick (``line``: up to its newline, if it came): what it
        is, and how many characters of it that decides, or None until more of it comes."""
        ticks = len(line) - len(line.lstrip("`"))
        whole = line.endswith("\n")
        if ticks == len(line):
            return None  # only backticks so far
        if self._fence is None and ticks >= len(FENCE):
            if not whole:
                return None  # the language comes with the rest of the line
            words = line[ticks:].split()
            self._fence = line[:ticks]
            self._language = _language(words[0]) if words else DEFAULT_LANGUAGE
            return None, len(line)  # the fence line itself is neither message nor code
        if self._fence is not None and self._closes(line):
            if not whole:
                return None  # blank so far: the end of the line tells
            self.done = True
            return None, len(line)
        self._at_line_start = False
        return self._content(line[:ticks]), ticks  # backticks that open nothing: content

    def _closes(self, line: str) -> bool:
        """Whether ``line`` (so far) is the code block's closing fence."""
        assert self._fence is not None
        ticks = len(line) - len(line.lstrip("`"))
        return ticks >= len(self._fence) and not line[ticks:].strip()

    def _content(self, text: str) -> Piece:
        if self._fence is None:
            return {"type": "message", "content": text}
        return {"type": "code", "format": self._language, "content": text}


def _language(word: str) -> str:
    """A fence's language name: its letters and digits (``py3`` stays, ``{python}`` loses its
    braces), as Open Interpreter's languages are named."""
    name = "".join(char for char in word if char.isalnum() or char in "+#-_").lower()
    return name or DEFAULT_LANGUAGE


def _merged(pieces: list[Piece]) -> list[Piece]:
    merged: list[Piece] = []
    for piece in pieces:
        if not piece["content"]:
            continue
        last = merged[-1] if merged else None
        if (
            last is not None
            and last["type"] == piece["type"]
            and last.get("format") == piece.get("format")
        ):
            last["content"] += piece["content"]
        else:
            merged.append(dict(piece))
    return merged


def parse(chunks: list[str]) -> list[Piece]:
    """A whole answer's pieces (tests and tools): fed chunk by chunk, then closed."""
    parser = FenceParser()
    pieces: list[Piece] = []
    for chunk in chunks:
        pieces += parser.feed(chunk)
        if parser.done:
            break
    return _merged(pieces + parser.close())


def run_text_llm(llm: Any, params: dict[str, Any]) -> Iterator[Piece]:
    """Open Interpreter's ``run_text_llm`` with ``FenceParser`` reading the model's answer."""
    if llm.execution_instructions:
        params["messages"][0]["content"] += "\n" + llm.execution_instructions
    parser = FenceParser()
    for chunk in llm.completions(**params):
        # Read as Open Interpreter reads it (LiteLLM's chunks answer to a dict's access).
        if "choices" not in chunk or len(chunk["choices"]) == 0:
            continue
        content = chunk["choices"][0]["delta"].get("content", "")
        if not content:
            continue
        yield from parser.feed(content)
        if parser.done:
            return
    yield from parser.close()
