"""The ranger console: a web interface (pages + JSON API) served by the fleet server's process.

``make_app(Console(...))`` is the ASGI app; ``serve`` runs it with uvicorn in a thread beside
the MQTT server. Needs the ``console`` extra (starlette, jinja2, uvicorn, argon2-cffi).
"""

from __future__ import annotations

from .app import Console, make_app
from .serve import HttpServer, parse_listen

__all__ = ["Console", "HttpServer", "make_app", "parse_listen"]
