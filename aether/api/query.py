"""Query parameters read strictly, as the OpenAPI document describes them.

Python's ``int()`` and ``float()`` take more than a number: surrounding whitespace (``9\\r``),
underscores (``1_000``), ``nan`` and ``inf``; and ``request.args.get`` silently takes the first
of a parameter given twice. A request the schema calls invalid gets a 400 here, never a page
answered from half of it.

@.architecture
role: query parameters
jobs: [schema_validation]
"""

from __future__ import annotations

import math
import re

from werkzeug.datastructures import MultiDict

_INTEGER = re.compile(r"-?[0-9]+")
_NUMBER = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")


class InvalidQuery(ValueError):
    """A query parameter that is not what the route's schema says; the message says which."""


def single(args: MultiDict[str, str], name: str) -> str | None:
    """The parameter's one value, or None when absent. Raises InvalidQuery if given twice."""
    values = args.getlist(name)
    if len(values) > 1:
        raise InvalidQuery(f"{name} is given {len(values)} times")
    return values[0] if values else None


def integer(args: MultiDict[str, str], name: str, default: int) -> int:
    value = single(args, name)
    return default if value is None else integer_value(value, name)


def integer_value(value: str, name: str) -> int:
    """``value`` as an integer, strictly (a header's, too). Raises InvalidQuery."""
    if not _INTEGER.fullmatch(value):
        raise InvalidQuery(f"{name} must be an integer")
    return int(value)


def number(args: MultiDict[str, str], name: str) -> float | None:
    value = single(args, name)
    if value is None:
        return None
    if not _NUMBER.fullmatch(value) or not math.isfinite(parsed := float(value)):
        raise InvalidQuery(f"{name} must be a number")
    return parsed
