"""The HTTP edge of every service: the bearer key, the body-size limit and one error shape, OpenAI's
``{"error": {"message", "type", "param", "code"}}`` (``code`` is the HTTP status), so the ``openai``
client raises the matching exception. A 422's message names each field: ``groups.0.responses: ...``.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

KINDS = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error",
         500: "server_error", 502: "upstream_error", 503: "service_unavailable"}  # fmt: skip


class ErrorDetail(BaseModel):
    message: str = Field(description="what is wrong; a 422 names each field: 'groups.0.responses: ...'")
    type: str = Field(description="invalid_request_error, authentication_error, service_unavailable, ...")
    param: str | None = Field(None, description="the request field at fault, if one is")
    code: int = Field(description="the HTTP status")


class ErrorResponse(BaseModel):
    """OpenAI's error body, the shape of every error the services answer."""

    error: ErrorDetail


ERRORS = {
    400: "bad request: a body that is not JSON, or a value the route refuses (the message says which)",
    401: "missing or wrong bearer API key",
    404: "not found",
    413: "request body larger than max_body_bytes",
    422: "invalid request: the message names each field at fault",
    429: "too many requests in flight",
    502: "the upstream backend failed (the message says why)",
    503: "not ready or busy; retry after Retry-After seconds when given",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: each status documented with OpenAI's error body."""
    return {code: {"model": ErrorResponse, "description": ERRORS[code]} for code in codes}


def limit_schema(app: FastAPI, limits: dict[str, dict[str, dict[str, Any]]]) -> None:
    """Puts limits that are settings into ``app``'s OpenAPI schema, so a schema-valid request is within them.

    ``limits``: component name -> property -> JSON-schema keywords merged into it (``items`` merged into
    the item schema), e.g. ``{"ScoreRequest": {"groups": {"maxItems": 64}}}``. The routes validate the same
    limits themselves, with messages that name the setting.
    """
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = default_openapi()
            components = schema.get("components", {}).get("schemas", {})
            for name, properties in limits.items():
                for prop, keywords in properties.items():
                    target = components[name]["properties"][prop]
                    keywords = dict(keywords)
                    if "items" in keywords:
                        target.setdefault("items", {}).update(keywords.pop("items"))
                    target.update(keywords)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


class APIError(HTTPException):
    """An ``HTTPException`` that also names the request field at fault (OpenAI's ``param``)."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(status, message, headers=headers)
        self.param = param


def error_response(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    """OpenAI's error shape as a response; its ``type`` follows from the status."""
    kind = KINDS.get(status, "invalid_request_error" if status < 500 else "server_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def field_error(loc: tuple, msg: str, kind: str = "value_error") -> dict:
    """One entry of a ``RequestValidationError`` for a field of the body (``loc`` without ``"body"``)."""
    return {"type": kind, "loc": ("body", *loc), "msg": msg, "input": None}


def _field(loc: tuple | list) -> str:
    parts = loc[1:] if len(loc) > 1 and loc[0] == "body" else loc
    return ".".join(str(p) for p in parts)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail), getattr(exc, "param", None), exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    lines = []
    for e in errors[:20]:
        if e.get("type") == "json_invalid":
            reason = (e.get("ctx") or {}).get("error", e["msg"])
            lines.append(f"body: invalid JSON at position {e['loc'][-1]}: {reason}")
        else:
            lines.append(f"{_field(e['loc'])}: {e['msg']}")
    param = _field(errors[0]["loc"]) if errors else None
    return error_response(422, "; ".join(lines) or "invalid request", param=param)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("event=unhandled_error path=%s error=%s", request.url.path, type(exc).__name__)
    return error_response(500, f"internal error: {type(exc).__name__}")


def install_error_handlers(app: FastAPI) -> None:
    """Every error ``app`` answers (routing, HTTP, validation, unhandled) in OpenAI's shape."""
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)


_bearer = HTTPBearer(auto_error=False, description="the service's API key, when one is set")


def bearer_key(key: str | None) -> Callable[..., None]:
    """A dependency: 401 unless ``Authorization: Bearer <key>`` (constant-time); open when ``key`` is unset,
    and then the OpenAPI schema declares no security either."""
    if not key:

        def open_access() -> None:
            return None

        return open_access
    expected = key.encode()

    def require_key(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
        given = credentials.credentials.encode() if credentials else b""
        if not secrets.compare_digest(given, expected):
            raise APIError(401, "missing or wrong bearer API key", headers={"WWW-Authenticate": "Bearer"})

    return require_key


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` (declared, or counted while it streams in) gets 413."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message, size = f"request body larger than {self.max_bytes} bytes (max_body_bytes)", 0
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await error_response(413, message)(scope, receive, send)

        async def bounded() -> dict:  # raised while the route reads the body: FastAPI passes HTTPExceptions on
            nonlocal size
            event = await receive()
            size += len(event.get("body", b""))
            if size > self.max_bytes:
                raise APIError(413, message)
            return event

        await self.app(scope, bounded, send)
