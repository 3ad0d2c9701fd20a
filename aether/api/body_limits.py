"""Per-route request body limits for Quart-Trio.

Quart bounds every request body by one ``MAX_CONTENT_LENGTH``, read when the request is created.
File uploads need a larger bound than the JSON routes, so this connection class looks the
route's limit up first: ``max_body_bytes`` everywhere, ``max_file_bytes`` plus room for the
multipart framing on the upload route. A body over its limit gets Quart's 413, which the app
turns into a JSON error.

@.architecture
role: request body limits
jobs: [validation]
"""

from __future__ import annotations

import re
from typing import Any

from quart.wrappers import Request
from quart_trio.asgi import TrioASGIHTTPConnection

# Room for the multipart boundaries, part headers and form fields around an uploaded file.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
UPLOAD_ROUTE = re.compile(r"^/v1/conversations/[^/]+/files$")
BODY_LIMITS_KEY = "AETHER_UPLOAD_BODY_BYTES"


def upload_body_limit(max_file_bytes: int) -> int:
    return max_file_bytes + MULTIPART_OVERHEAD_BYTES


class BodyLimitedHTTPConnection(TrioASGIHTTPConnection):
    def _create_request_from_scope(self, send: Any) -> Request:
        config = self.app.config
        if not UPLOAD_ROUTE.match(self.scope["path"]):
            return super()._create_request_from_scope(send)
        default = config["MAX_CONTENT_LENGTH"]
        # Swapped and restored without a yield in between: no other request can see it.
        config["MAX_CONTENT_LENGTH"] = config[BODY_LIMITS_KEY]
        try:
            request = super()._create_request_from_scope(send)
        finally:
            config["MAX_CONTENT_LENGTH"] = default
        request.max_content_length = config[BODY_LIMITS_KEY]  # the form parser's own bound
        return request
