"""The shared HTTP edge over real HTTP: bearer key (401), body limit (413), OpenAI's error shape (422, 500, ...)."""

from __future__ import annotations

import httpx
import openai
import pytest
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field

from shared.http_edge import APIError, BodyLimit, bearer_key, field_error, install_error_handlers
from tests.fixtures.judge import serve_in_thread

LIMIT = 2048


class Item(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)


class Body(BaseModel):
    items: list[Item] = Field(min_length=1)


def tiny_app(key: str | None) -> FastAPI:
    app = FastAPI()
    app.add_middleware(BodyLimit, max_bytes=LIMIT)
    install_error_handlers(app)
    authorized = [Depends(bearer_key(key))]

    @app.post("/v1/items", dependencies=authorized)
    async def items(body: Body, request: Request) -> dict:
        if body.items[0].name == "limit":
            raise RequestValidationError([field_error(("items", 0, "name"), "over our own limit", "too_long")])
        return {"count": len(body.items), "bytes": len(await request.body())}

    @app.get("/v1/models", dependencies=authorized)
    async def models() -> dict:
        return {"object": "list", "data": []}

    @app.get("/busy")
    async def busy() -> None:
        raise HTTPException(503, "queue full", headers={"Retry-After": "7"})

    @app.get("/bad-n")
    async def bad_n() -> None:
        raise APIError(400, "n must be an integer in [1, 16]", param="n")

    @app.get("/bug")
    async def bug() -> None:
        raise ZeroDivisionError("a bug")

    return app


@pytest.fixture(scope="module")
def url():
    with serve_in_thread(tiny_app("s3cret")) as base:
        yield base


AUTH = {"Authorization": "Bearer s3cret"}


def error_of(reply: httpx.Response, status: int, kind: str) -> dict:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(reply.json()) == {"error"} and set(error) == {"message", "type", "param", "code"}
    assert error["type"] == kind and error["code"] == status and error["message"]
    return error


def test_valid_request_passes_and_the_body_is_replayed(url):
    body = {"items": [{"name": "a"}, {"name": "b"}]}
    reply = httpx.post(f"{url}/v1/items", json=body, headers=AUTH)
    assert reply.status_code == 200 and reply.json()["count"] == 2 and reply.json()["bytes"] > 0


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": "s3cret"}])
def test_missing_or_wrong_key_is_401(url, headers):
    reply = httpx.post(f"{url}/v1/items", json={"items": [{"name": "a"}]}, headers=headers)
    assert "bearer" in error_of(reply, 401, "authentication_error")["message"]
    assert reply.headers["www-authenticate"] == "Bearer"


def test_no_key_configured_means_open():
    with serve_in_thread(tiny_app(None)) as base:
        assert httpx.post(f"{base}/v1/items", json={"items": [{"name": "a"}]}).status_code == 200


def test_oversize_body_is_413_declared_or_streamed(url):
    big = {"items": [{"name": "x" * (LIMIT + 1)}]}
    reply = httpx.post(f"{url}/v1/items", json=big, headers=AUTH)
    assert "max_body_bytes" in error_of(reply, 413, "invalid_request_error")["message"]

    def chunks():  # no Content-Length: counted while streaming
        for _ in range(LIMIT // 512 + 2):
            yield b" " * 512

    reply = httpx.post(f"{url}/v1/items", content=chunks(), headers={**AUTH, "content-type": "application/json"})
    error_of(reply, 413, "invalid_request_error")


@pytest.mark.parametrize(
    "body, field",
    [
        ({}, "items"),
        ({"items": []}, "items"),
        ({"items": [{"name": "a"}, {"name": ""}]}, "items.1.name"),
        ({"items": [{"name": "a", "extra": 1}]}, "items.0.extra"),
        ({"items": [{"name": "limit"}]}, "items.0.name"),  # a RequestValidationError raised by the route
    ],
)
def test_validation_error_is_422_naming_the_field(url, body, field):
    error = error_of(httpx.post(f"{url}/v1/items", json=body, headers=AUTH), 422, "invalid_request_error")
    assert error["message"].startswith(f"{field}: ") and error["param"] == field


def test_malformed_json_is_422_with_the_position(url):
    reply = httpx.post(f"{url}/v1/items", content=b'{"items": [', headers={**AUTH, "content-type": "application/json"})
    assert error_of(reply, 422, "invalid_request_error")["message"].startswith("body: invalid JSON at position")


def test_http_exceptions_keep_status_headers_and_param(url):
    reply = httpx.get(f"{url}/busy")
    assert error_of(reply, 503, "service_unavailable")["message"] == "queue full"
    assert reply.headers["retry-after"] == "7"
    assert error_of(httpx.get(f"{url}/bad-n"), 400, "invalid_request_error")["param"] == "n"
    error_of(httpx.get(f"{url}/no-such-route"), 404, "not_found_error")
    error_of(httpx.get(f"{url}/v1/items"), 405, "invalid_request_error")


def test_unhandled_exception_is_500_in_the_same_shape(url):
    assert "ZeroDivisionError" in error_of(httpx.get(f"{url}/bug"), 500, "server_error")["message"]


def test_the_openai_client_raises_the_matching_exception(url):
    with openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError) as raised:
            client.models.list()
    assert raised.value.body["type"] == "authentication_error" and "bearer" in raised.value.message
    with openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0) as client:
        assert client.models.list().data == []
