"""Web search for the agentic path: a ``web_search()`` function in Open Interpreter's Python.

When ``search_url`` names a SearxNG-style search API, each interpreter gets, before its first
turn, a function defined in its Python kernel that calls that API with httpx and returns plain
results, and its system message says the function exists. Without a search API the function is
never defined and the tool catalog says why. The URL comes from the server's configuration only.

@.architecture
role: web search capability
jobs: [tool_catalog_generation, settings_configuration]
"""

from __future__ import annotations

from aether.config import Settings

INSTRUCTIONS = (
    "To search the web, call web_search(query) in Python: it returns a list of dicts with "
    "'title', 'url' and 'snippet'. Print what you need from the results."
)

_FUNCTION = '''
def web_search(query, limit={limit}):
    """Search the web; a list of {{"title", "url", "snippet"}} dicts, best first."""
    import httpx

    response = httpx.get({url!r}, params={{"q": query, "format": "json"}}, timeout=15)
    response.raise_for_status()
    return [
        {{"title": r.get("title", ""), "url": r.get("url", ""), "snippet": r.get("content", "")}}
        for r in response.json().get("results", [])[:limit]
    ]
'''


def web_search_code(settings: Settings) -> str | None:
    """The Python that defines ``web_search`` in an interpreter, or None without a search API."""
    if settings.search_url is None:
        return None
    return _FUNCTION.format(url=settings.search_url, limit=settings.search_results)


def unavailable_reason(settings: Settings, agentic_path: bool) -> str | None:
    if settings.search_url is None:
        return "no search backend is configured (AETHER_SEARCH_URL)"
    if not agentic_path:
        return "web search is a tool of the agentic path, which is not available"
    return None
