"""The ``Vary: Cookie`` an aiohttp response gets when its request used the session: a shared cache must not
serve one visitor's session-dependent page to another. Rule: ``Cookie`` is added once, to whatever ``Vary``
the app set, and not where ``Vary: *`` already covers it."""

from __future__ import annotations

from aiohttp import web


def vary_by_cookie(response: web.StreamResponse) -> None:
    tokens = {token.strip().lower() for value in response.headers.getall("Vary", ()) for token in value.split(",")}
    if not tokens & {"cookie", "*"}:
        response.headers.add("Vary", "Cookie")
