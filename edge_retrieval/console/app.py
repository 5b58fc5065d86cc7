"""The ranger console: pages (Jinja2 + htmx) and a JSON API over the fleet server's state.

Every route but the login form and static files needs a session (``_guard``): a page without one
redirects to /login, an API route answers 401. Every state-changing request (POST, PATCH,
DELETE) needs the session's CSRF token, as a form field ``csrf`` or an ``X-CSRF-Token`` header,
else 403; the login form has its own double-submit token. Viewers read; rangers change alerts
and give feedback (else 403). Templates autoescape, and a Content-Security-Policy allows only
this origin's scripts (no inline script), so a device-supplied string renders as text.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

from ..errors import ConfigError, EdgeRetrievalError, QueryRejected, TransportError
from ..protocol import NAME_RE, utcnow
from ..server.alerts import AlertManager
from ..server.feedback import Feedback
from ..server.store import ServerStore, parse_since
from ..server.users import LoginLimiter, Session, Users

try:
    import jinja2
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import (
        FileResponse,
        HTMLResponse,
        JSONResponse,
        RedirectResponse,
        Response,
        StreamingResponse,
    )
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles
except ImportError as exc:  # the console is an optional extra
    raise ImportError("the console needs its extra: pip install 'edge-retrieval[console]'") from exc

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
COOKIE = "er_session"
LOGIN_COOKIE = "er_login"  # the login form's double-submit CSRF token
STREAM_POLL_S = 0.5  # how often the live stream looks for new or updated detections (seconds)
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; media-src 'self'; "
       "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'")

Handler = Callable[[Request], Awaitable[Response]]


@dataclass
class Console:
    """What the console reads and changes: one server's store, alerts, feedback and accounts.

    ``builder`` (a ``text.QueryBuilder``) is needed to add alerts (their text is resolved with the
    bundle's text side); without it the console reads and revises but cannot add.
    """

    store: ServerStore
    alerts: AlertManager
    feedback: Feedback
    users: Users
    builder: Any | None = None
    secure_cookies: bool = False  # set when served over https (directly or behind a proxy)
    limiter: LoginLimiter | None = None

    def __post_init__(self) -> None:
        self.limiter = self.limiter or LoginLimiter()


# --------------------------------------------------------------------------- guards


class Forbidden(Exception):
    """A request the session may not make (role or CSRF): 403."""


def _session(request: Request) -> Session | None:
    return request.app.state.console.users.session(request.cookies.get(COOKIE))


async def _form_or_json(request: Request) -> dict[str, Any]:
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            body = await request.json()
        except ValueError as exc:
            raise QueryRejected("request body is not JSON") from exc
        if not isinstance(body, dict):
            raise QueryRejected("request body must be a JSON object")
        return body
    form = await request.form()
    return {k: v for k, v in form.items() if isinstance(v, str)}


def _guard(role: str = "viewer") -> Callable[[Callable[..., Awaitable[Response]]], Handler]:
    """Session required (401 / redirect); for changes, the CSRF token and the ranger role (403)."""

    def deco(fn: Callable[..., Awaitable[Response]]) -> Handler:
        @functools.wraps(fn)
        async def wrapper(request: Request) -> Response:
            api = request.url.path.startswith("/api/")
            sess = _session(request)
            if sess is None:
                if api or request.method != "GET":
                    return JSONResponse({"error": "login required"}, status_code=401)
                return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)
            body: dict[str, Any] = {}
            if request.method not in ("GET", "HEAD"):
                body = await _form_or_json(request)
                token = request.headers.get("x-csrf-token") or str(body.get("csrf", ""))
                if not hmac.compare_digest(token.encode(), sess.csrf.encode()):
                    return _error(request, "missing or wrong CSRF token", 403)
            if role == "ranger" and not sess.can_change:
                return _error(request, f"user {sess.name!r} is a viewer (rangers only)", 403)
            try:
                return await fn(request, sess, body)
            except (ConfigError, QueryRejected) as exc:
                return _error(request, str(exc), 400)
            except TransportError as exc:
                return _error(request, str(exc), 503)
            except EdgeRetrievalError as exc:
                return _error(request, str(exc), 500)

        return wrapper

    return deco


def _error(request: Request, message: str, status: int) -> Response:
    """JSON for the API, an HTML fragment for pages (htmx swaps it, a browser shows it)."""
    if request.url.path.startswith("/api/"):
        return JSONResponse({"error": message}, status_code=status)
    return _render(request, "_error.html", {"message": message}, status=status)


def _render(request: Request, name: str, ctx: dict[str, Any], status: int = 200,
            session: Session | None = None) -> HTMLResponse:
    env: jinja2.Environment = request.app.state.jinja
    sess = session or _session(request)
    html = env.get_template(name).render(request=request, session=sess, path=request.url.path, **ctx)
    return HTMLResponse(html, status_code=status)


def _htmx(request: Request) -> bool:
    return bool(request.headers.get("hx-request"))


# --------------------------------------------------------------------------- views of the state


def _devices(c: Console) -> list[dict[str, Any]]:
    """Devices with their health, and site/position from their newest detection."""
    out = []
    for d in c.store.devices():
        h = d.get("health") or {}
        last = c.store.changed_detections(device=d["device"], limit=1)
        ev = last[0] if last else {}
        out.append({
            "device": d["device"], "state": d["state"], "last_seen": d["last_seen"],
            "offline_since": d["offline_since"], "clock": d["clock"], "low_disk": d["low_disk"],
            "rtf": h.get("rtf"), "dropped": h.get("dropped"), "outbox_depth": h.get("outbox_depth"),
            "free_mb": h.get("free_mb"), "queries": h.get("query_ids"), "suppressed": h.get("suppressed") or {},
            "site": ev.get("site"), "lat": ev.get("lat"), "lon": ev.get("lon"),
        })
    return out


def _plot(devices: list[dict[str, Any]], w: float = 360.0, h: float = 240.0) -> list[dict[str, Any]]:
    """Positions in an SVG box (equirectangular, bounding box of the devices with lat/lon)."""
    pts = [d for d in devices if isinstance(d["lat"], int | float) and isinstance(d["lon"], int | float)]
    if not pts:
        return []
    lats, lons = [p["lat"] for p in pts], [p["lon"] for p in pts]
    span = max(max(lats) - min(lats), max(lons) - min(lons), 1e-3)
    mid_lat, mid_lon = (max(lats) + min(lats)) / 2, (max(lons) + min(lons)) / 2
    scale = (min(w, h) - 48.0) / span  # degrees -> pixels, the box centred on the devices
    return [{"device": p["device"], "state": p["state"], "x": w / 2 + (p["lon"] - mid_lon) * scale,
             "y": h / 2 - (p["lat"] - mid_lat) * scale} for p in pts]


def _alerts(c: Console) -> list[dict[str, Any]]:
    """Active alerts with feedback given and false alarms removed (windows devices suppressed)."""
    removed: dict[str, int] = {}
    for d in c.store.devices():
        for qid, n in ((d.get("health") or {}).get("suppressed") or {}).items():
            if isinstance(n, int):
                removed[qid] = removed.get(qid, 0) + n
    counts = c.feedback.counts()
    out = []
    for a in c.store.alerts():
        msg = json.loads(a["message"])
        out.append({"id": a["id"], "text": a["text"], "target_kind": a["target_kind"], "target": a["target"],
                    "version": a["version"], "threshold": a["threshold"], "created": a["created"],
                    "negatives": len(msg.get("negatives", [])), "positives": len(msg.get("positives", [])),
                    "feedback": counts.get(a["id"], {"false_alarm": 0, "correct": 0}),
                    "suppressed": removed.get(a["id"], 0)})
    return out


def _detection(row: dict[str, Any]) -> dict[str, Any]:
    d = {k: row[k] for k in ("event_id", "device", "query_id", "query", "score", "start_s", "end_s", "time",
                             "clock", "source", "final", "site", "lat", "lon", "received", "updated")}
    d["changed"] = row.get("changed") or row["updated"]
    d["has_clip"] = bool(row.get("clip_path"))
    return d


def _filters(request: Request) -> dict[str, str | None]:
    q = request.query_params
    f = {"device": q.get("device") or None, "alert": q.get("alert") or None, "since": q.get("since") or None}
    for key in ("device", "alert"):
        if f[key] is not None and not NAME_RE.match(f[key] or ""):
            raise QueryRejected(f"filter {key}={f[key]!r} is not a valid name")
    return f


def _query(c: Console, f: dict[str, str | None], after: str = "", limit: int = 200) -> list[dict[str, Any]]:
    since = None
    if f["since"]:
        since = parse_since(f["since"]).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    rows = c.store.changed_detections(after, device=f["device"], query_id=f["alert"], since=since, limit=limit)
    return [_detection(r) for r in rows]


# --------------------------------------------------------------------------- login


async def login_page(request: Request) -> Response:
    token = secrets.token_urlsafe(24)
    nxt = request.query_params.get("next", "/")
    resp = _render(request, "login.html", {"login_csrf": token, "next": _safe_next(nxt), "message": None},
                   session=None)
    _set_cookie(request, resp, LOGIN_COOKIE, token, max_age=3600)
    return resp


def _safe_next(nxt: str) -> str:
    u = urlparse(nxt)
    return nxt if nxt.startswith("/") and not nxt.startswith("//") and not u.netloc and not u.scheme else "/"


def _set_cookie(request: Request, resp: Response, name: str, value: str, max_age: int | None = None) -> None:
    c: Console = request.app.state.console
    resp.set_cookie(name, value, max_age=max_age, httponly=True, samesite="strict", secure=c.secure_cookies,
                    path="/")


async def login(request: Request) -> Response:
    c: Console = request.app.state.console
    body = await _form_or_json(request)
    token = str(body.get("csrf", ""))
    cookie = request.cookies.get(LOGIN_COOKIE, "")
    if not cookie or not hmac.compare_digest(token.encode(), cookie.encode()):
        return JSONResponse({"error": "missing or wrong CSRF token"}, status_code=403)
    name, password = str(body.get("name", "")), str(body.get("password", ""))
    ip = request.client.host if request.client else "?"
    assert c.limiter is not None
    if c.limiter.blocked(f"ip:{ip}", f"user:{name}"):
        return JSONResponse({"error": "too many failed logins; try again in a few minutes"}, status_code=429)
    ok = await run_in_threadpool(c.users.verify, name, password)  # argon2 takes ~50 ms: off the loop
    if not ok:
        c.limiter.failed(f"ip:{ip}", f"user:{name}")
        new = secrets.token_urlsafe(24)
        resp = _render(request, "login.html", {"login_csrf": new, "next": _safe_next(str(body.get("next", "/"))),
                                               "message": "wrong name or password"}, status=401, session=None)
        _set_cookie(request, resp, LOGIN_COOKIE, new, max_age=3600)
        return resp
    resp = RedirectResponse(_safe_next(str(body.get("next", "/"))), status_code=303)
    _set_cookie(request, resp, COOKIE, c.users.open_session(name))
    resp.delete_cookie(LOGIN_COOKIE, path="/")
    return resp


@_guard()
async def logout(request: Request, sess: Session, body: dict[str, Any]) -> Response:
    request.app.state.console.users.close_session(request.cookies.get(COOKIE))
    resp = RedirectResponse("/login", status_code=303)
    resp.delete_cookie(COOKIE, path="/")
    return resp


# --------------------------------------------------------------------------- pages


@_guard()
async def home(request: Request, sess: Session, body: dict[str, Any]) -> Response:
    return RedirectResponse("/detections", status_code=303)


@_guard()
async def devices_page(request: Request, sess: Session, body: dict[str, Any]) -> Response:
    devs = _devices(request.app.state.console)
    return _render(request, "devices.html", {"devices": devs, "plot": _plot(devs)}, session=sess)


@_guard()
async def detections_page(request: Request, sess: Session, body: dict[str, Any]) -> Response:
    c: Console = request.app.state.console
    f = _filters(request)
    rows = _query(c, f)
    return _render(request, "detections.html", {
        "rows": rows, "filters": f, "devices": [d["device"] for d in c.store.devices()],
        "alerts": [a["id"] for a in c.store.alerts()], "cursor": utcnow(),
        "stream": "/detections/stream?" + str(request.query_params),
    }, session=sess)


@_guard()
async def alerts_page(request: Request, sess: Session, body: dict[str, Any]) -> Response:
    c: Console = request.app.state.console
    return _render(request, "alerts.html", {"alerts": _alerts(c), "can_add": c.builder is not None}, session=sess)


def _stream(request: Request, html: bool) -> StreamingResponse:
    """Server-sent events: each new or updated detection matching the filters, as it is stored."""
    c: Console = request.app.state.console
    f = _filters(request)
    env: jinja2.Environment = request.app.state.jinja
    sess = _session(request)

    async def gen() -> Any:
        after = request.query_params.get("after") or utcnow()
        seen: set[tuple[str, str, str]] = set()
        idle = 0.0
        yield "retry: 2000\n\n"
        while not await request.is_disconnected():
            if _session(request) is None:  # logged out (or expired) while the stream was open
                return
            rows = await run_in_threadpool(_query, c, f, after, 100)
            for d in reversed(rows):
                key = (d["device"], d["event_id"], d["changed"])
                if key in seen:
                    continue
                seen.add(key)
                after = max(after, d["changed"])
                if html:
                    data = env.get_template("_detection.html").render(d=d, session=sess)
                else:
                    data = json.dumps(d)
                yield "event: detection\n" + "".join(f"data: {line}\n" for line in data.splitlines()) + "\n"
                idle = 0.0
            if len(seen) > 10_000:
                seen = {k for k in seen if k[2] >= after}
            idle += STREAM_POLL_S
            if idle >= 15.0:  # keep proxies from closing a quiet stream
                yield ": keep-alive\n\n"
                idle = 0.0
            await asyncio.sleep(STREAM_POLL_S)

    return StreamingResponse(gen(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


@_guard()
async def detections_stream(request: Request, sess: Session, body: dict[str, Any]) -> Response:
    return _stream(request, html=True)


@_guard()
async def api_detections_stream(request: Request, sess: Session, body: dict[str, Any]) -> Response:
    return _stream(request, html=False)


def _stored(c: Console, request: Request) -> dict[str, Any]:
    dev, eid = request.path_params["device"], request.path_params["event_id"]
    if not (NAME_RE.match(dev) and NAME_RE.match(eid)):
        raise QueryRejected(f"detection {dev!r}/{eid!r} is not a valid device/event id")
    row = c.store.detection(dev, eid)
    if row is None:
        raise _NotFound(f"no detection {eid!r} from {dev!r}")
    return row


class _NotFound(QueryRejected):
    pass


def _not_found(fn: Handler) -> Handler:
    @functools.wraps(fn)
    async def wrapper(request: Request) -> Response:
        try:
            return await fn(request)
        except _NotFound as exc:
            return JSONResponse({"error": str(exc)}, status_code=404)

    return wrapper


@_guard()
async def clip(request: Request, sess: Session, body: dict[str, Any]) -> Response:
    row = _stored(request.app.state.console, request)
    if not row.get("clip_path") or not Path(row["clip_path"]).is_file():
        return JSONResponse({"error": "no clip for this detection yet"}, status_code=404)
    return FileResponse(row["clip_path"], media_type="audio/flac", headers={"Cache-Control": "private, max-age=3600"})


@_guard()
async def spectrogram_png(request: Request, sess: Session, body: dict[str, Any]) -> Response:
    from .spectrogram import clip_png

    row = _stored(request.app.state.console, request)
    path = Path(row["clip_path"]) if row.get("clip_path") else None
    if path is None or not path.is_file():
        return JSONResponse({"error": "no clip for this detection yet"}, status_code=404)
    cache = path.with_suffix(".png")
    if not cache.is_file() or cache.stat().st_mtime < path.stat().st_mtime:
        data = await run_in_threadpool(clip_png, path)
        tmp = cache.with_suffix(".png.part")
        tmp.write_bytes(data)
        tmp.replace(cache)
    return FileResponse(cache, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


@_guard("ranger")
async def feedback(request: Request, sess: Session, body: dict[str, Any]) -> Response:
    c: Console = request.app.state.console
    row = _stored(c, request)
    kind = str(body.get("kind", ""))
    alert = await run_in_threadpool(c.feedback.give, sess.name, row, kind)
    if request.url.path.startswith("/api/"):
        return JSONResponse({"alert": alert["id"], "version": alert["version"], "kind": kind})
    d = _detection(c.store.detection(row["device"], row["event_id"]) or row)
    d["feedback"] = kind
    if _htmx(request):
        return _render(request, "_detection.html", {"d": d}, session=sess)
    return RedirectResponse("/detections", status_code=303)


def _explain(c: Console, text: str) -> dict[str, Any]:
    if c.builder is None:
        raise ConfigError("adding alerts needs the full bundle (server --bundle DIR with its text side)")
    res = c.builder.resolve(text)
    weights = c.builder.expert_weights(text, res)
    return {"text": text.strip(), "experts": [
        {"expert": r.expert, "weight": round(w, 4), "fit": round(float(r.fit), 4), "warning": r.warning,
         "top": [[name, round(float(v), 4)] for name, v in r.top[:10]]} for r, w in zip(res, weights, strict=True)]}


def _alert_args(body: dict[str, Any]) -> dict[str, Any]:
    text = str(body.get("text", "")).strip()
    try:
        threshold = float(body.get("threshold", ""))
    except (TypeError, ValueError) as exc:
        raise QueryRejected(f"threshold {body.get('threshold')!r} is not a number (expected e.g. 0.3)") from exc
    kind, target = str(body.get("target_kind", "group")), str(body.get("target", "")).strip()
    if kind not in ("group", "device"):
        raise QueryRejected(f"target_kind {kind!r} is not valid (expected group or device)")
    return {"text": text, "threshold": threshold, kind: target}


@_guard("ranger")
async def alert_preview(request: Request, sess: Session, body: dict[str, Any]) -> Response:
    c: Console = request.app.state.console
    args = _alert_args(body)
    AlertManager.target(args.get("group"), args.get("device"))  # checks the target name first
    ex = await run_in_threadpool(_explain, c, args["text"])
    if request.url.path.startswith("/api/"):
        return JSONResponse(ex)
    return _render(request, "_preview.html", {"explain": ex, "form": body}, session=sess)


@_guard("ranger")
async def alert_add(request: Request, sess: Session, body: dict[str, Any]) -> Response:
    c: Console = request.app.state.console
    args = _alert_args(body)
    if c.builder is None:
        raise ConfigError("adding alerts needs the full bundle (server --bundle DIR with its text side)")
    c.alerts.builder = c.builder
    alert, _ = await run_in_threadpool(functools.partial(c.alerts.add, args.pop("text"), args.pop("threshold"), **args))
    if request.url.path.startswith("/api/"):
        return JSONResponse({k: alert[k] for k in ("id", "version", "target_kind", "target", "threshold")},
                            status_code=201)
    return RedirectResponse("/alerts", status_code=303)


@_guard("ranger")
async def alert_threshold(request: Request, sess: Session, body: dict[str, Any]) -> Response:
    c: Console = request.app.state.console
    try:
        thr = float(body.get("threshold", ""))
    except (TypeError, ValueError) as exc:
        raise QueryRejected(f"threshold {body.get('threshold')!r} is not a number (expected e.g. 0.3)") from exc
    alert = await run_in_threadpool(functools.partial(c.feedback.revise, request.path_params["alert_id"], threshold=thr))
    if request.url.path.startswith("/api/"):
        return JSONResponse({"id": alert["id"], "version": alert["version"], "threshold": alert["threshold"]})
    return RedirectResponse("/alerts", status_code=303)


@_guard("ranger")
async def alert_remove(request: Request, sess: Session, body: dict[str, Any]) -> Response:
    c: Console = request.app.state.console
    alert = await run_in_threadpool(c.alerts.remove, request.path_params["alert_id"])
    if request.url.path.startswith("/api/"):
        return JSONResponse({"id": alert["id"], "version": alert["version"], "deleted": True})
    return RedirectResponse("/alerts", status_code=303)


# --------------------------------------------------------------------------- JSON API


@_guard()
async def api_me(request: Request, sess: Session, body: dict[str, Any]) -> Response:
    return JSONResponse({"name": sess.name, "role": sess.role, "csrf": sess.csrf})


@_guard()
async def api_devices(request: Request, sess: Session, body: dict[str, Any]) -> Response:
    return JSONResponse(_devices(request.app.state.console))


@_guard()
async def api_detections(request: Request, sess: Session, body: dict[str, Any]) -> Response:
    try:
        limit = min(max(int(request.query_params.get("limit", "200")), 1), 10_000)
    except ValueError as exc:
        raise QueryRejected(f"limit {request.query_params.get('limit')!r} is not a number") from exc
    return JSONResponse(_query(request.app.state.console, _filters(request), limit=limit))


@_guard()
async def api_detection(request: Request, sess: Session, body: dict[str, Any]) -> Response:
    c: Console = request.app.state.console
    row = _stored(c, request)
    d = _detection(row)
    d["feedback"] = c.feedback.given(row["device"], row["event_id"])
    return JSONResponse(d)


@_guard()
async def api_alerts(request: Request, sess: Session, body: dict[str, Any]) -> Response:
    return JSONResponse(_alerts(request.app.state.console))


async def api_alerts_dispatch(request: Request) -> Response:
    return await (api_alerts if request.method == "GET" else alert_add)(request)


async def api_alert_dispatch(request: Request) -> Response:
    return await (alert_threshold if request.method == "PATCH" else alert_remove)(request)


# --------------------------------------------------------------------------- app


def _headers(app: Any) -> Any:
    """ASGI wrapper: security headers on every response."""

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def send_with(msg: dict[str, Any]) -> None:
            if msg["type"] == "http.response.start":
                h = list(msg.get("headers", []))
                h += [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                      (b"referrer-policy", b"same-origin"), (b"x-frame-options", b"DENY")]
                msg = {**msg, "headers": h}
            await send(msg)

        await app(scope, receive, send_with)

    return asgi


ROUTES = [
    Route("/login", login_page, methods=["GET"]),
    Route("/login", login, methods=["POST"]),
    Route("/logout", logout, methods=["POST"]),
    Route("/", home, methods=["GET"]),
    Route("/devices", devices_page, methods=["GET"]),
    Route("/detections", detections_page, methods=["GET"]),
    Route("/detections/stream", detections_stream, methods=["GET"]),
    Route("/detections/{device}/{event_id}/clip.flac", _not_found(clip), methods=["GET"]),
    Route("/detections/{device}/{event_id}/spectrogram.png", _not_found(spectrogram_png), methods=["GET"]),
    Route("/detections/{device}/{event_id}/feedback", _not_found(feedback), methods=["POST"]),
    Route("/alerts", alerts_page, methods=["GET"]),
    Route("/alerts/preview", alert_preview, methods=["POST"]),
    Route("/alerts/add", alert_add, methods=["POST"]),
    Route("/alerts/{alert_id}/threshold", alert_threshold, methods=["POST"]),
    Route("/alerts/{alert_id}/remove", alert_remove, methods=["POST"]),
    Route("/api/me", api_me, methods=["GET"]),
    Route("/api/devices", api_devices, methods=["GET"]),
    Route("/api/detections", api_detections, methods=["GET"]),
    Route("/api/detections/stream", api_detections_stream, methods=["GET"]),
    Route("/api/detections/{device}/{event_id}", _not_found(api_detection), methods=["GET"]),
    Route("/api/detections/{device}/{event_id}/feedback", _not_found(feedback), methods=["POST"]),
    Route("/api/alerts", api_alerts_dispatch, methods=["GET", "POST"]),
    Route("/api/alerts/explain", alert_preview, methods=["POST"]),
    Route("/api/alerts/{alert_id}", api_alert_dispatch, methods=["PATCH", "DELETE"]),
]


def make_app(console: Console) -> Any:
    """The ASGI app (Starlette, wrapped with security headers)."""
    app = Starlette(routes=[*ROUTES, Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static")])
    app.state.console = console
    app.state.jinja = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True)
    app.state.jinja.filters["tojson_attr"] = lambda v: json.dumps(v)
    return _headers(app)
