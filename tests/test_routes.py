"""The routes and the order of the inference checks, over HTTP against real servers."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from tests.conftest import CHAT_MODEL, EMBED_MODEL, PRIVATE_MODEL, TOKENS, USERS, Server, auth, chat


def assert_openai_error(document: Any, param: str | None = None) -> dict[str, Any]:
    error = document["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["param"] == param
    return error


async def call(
    http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> tuple[int, Any, aiohttp.ClientResponse]:
    async with http.request(method, url, **kwargs) as response:
        document = await response.json(content_type=None)
        return response.status, document, response


async def test_health_needs_no_token(gateway: Server, http: aiohttp.ClientSession) -> None:
    status, document, _ = await call(http, "GET", f"{gateway.url}/health")
    assert (status, document) == (200, {"status": "ok"})


async def test_status_lists_public_clusters_only(gateway: Server, http: aiohttp.ClientSession) -> None:
    status, document, _ = await call(http, "GET", f"{gateway.url}/status")
    assert (status, document) == (200, {"local": True, "chatonly": True})


async def test_whoami(gateway: Server, http: aiohttp.ClientSession) -> None:
    status, document, _ = await call(http, "GET", f"{gateway.url}/whoami", headers=auth("alice"))
    assert status == 200
    assert document == {
        "id": USERS["alice"]["id"],
        "name": "Alice",
        "username": "alice@uni.edu",
        "user_group_uuids": USERS["alice"]["groups"],
        "idp_id": "",
        "idp_name": "uni.edu",
        "auth_service": "static",
    }


@pytest.mark.parametrize(
    "headers, fragment",
    [
        ({}, "Missing"),
        ({"Authorization": f"Basic {TOKENS['alice']}"}, "Bearer scheme"),
        ({"Authorization": "Bearer "}, "empty"),
        ({"Authorization": "Bearer    "}, "empty"),
        ({"Authorization": "Bearer not-a-token"}, "Invalid"),
        ({"Authorization": f"Bearer {TOKENS['alice']}x"}, "Invalid"),
    ],
)
async def test_bad_tokens_get_401(
    gateway: Server, http: aiohttp.ClientSession, headers: dict[str, str], fragment: str
) -> None:
    for method, path, body in [
        ("GET", "/whoami", None),
        ("GET", "/list-endpoints", None),
        ("GET", "/v1/models", None),
        ("GET", "/local/jobs", None),
        ("POST", "/local/vllm/v1/chat/completions", chat()),
    ]:
        status, document, response = await call(http, method, gateway.url + path, headers=headers, json=body)
        assert status == 401, path
        error = assert_openai_error(document)
        assert fragment in error["message"]
        assert error["type"] == "authentication_error"
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert TOKENS["alice"] not in error["message"]


async def test_authentication_comes_before_body_checks(gateway: Server, http: aiohttp.ClientSession) -> None:
    url = f"{gateway.url}/nowhere/vllm/v1/chat/completions"
    status, _, _ = await call(http, "POST", url, data=b"{not json")
    assert status == 401


async def test_list_endpoints_shows_what_the_caller_may_use(
    gateway: Server, http: aiohttp.ClientSession
) -> None:
    _, alice, _ = await call(http, "GET", f"{gateway.url}/list-endpoints", headers=auth("alice"))
    _, bob, _ = await call(http, "GET", f"{gateway.url}/list-endpoints", headers=auth("bob"))
    paths = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/messages"]
    assert alice["clusters"]["local"] == {
        "base_url": "/resource_server/local",
        "frameworks": {
            "vllm": {
                "models": sorted([CHAT_MODEL, EMBED_MODEL, PRIVATE_MODEL, "dead/model", "slow/model"]),
                "endpoints": paths,
            }
        },
    }
    assert alice["clusters"]["uni"]["frameworks"]["vllm"]["models"] == [CHAT_MODEL]
    assert alice["clusters"]["chatonly"]["frameworks"]["vllm"]["endpoints"] == ["/v1/chat/completions"]
    assert PRIVATE_MODEL not in bob["clusters"]["local"]["frameworks"]["vllm"]["models"]
    assert "uni" not in bob["clusters"]


async def test_models_in_openai_list_format(gateway: Server, http: aiohttp.ClientSession) -> None:
    _, document, _ = await call(http, "GET", f"{gateway.url}/v1/models", headers=auth("bob"))
    assert document["object"] == "list"
    ids = [model["id"] for model in document["data"]]
    assert ids == sorted(ids) and PRIVATE_MODEL not in ids and CHAT_MODEL in ids
    chat_card = next(model for model in document["data"] if model["id"] == CHAT_MODEL)
    assert chat_card["object"] == "model" and isinstance(chat_card["created"], int)
    assert chat_card["clusters"] == ["local", "chatonly"]
    _, alice, _ = await call(http, "GET", f"{gateway.url}/uni/vllm/v1/models", headers=auth("alice"))
    assert [model["id"] for model in alice["data"]] == [CHAT_MODEL]
    status, bob, _ = await call(http, "GET", f"{gateway.url}/uni/vllm/v1/models", headers=auth("bob"))
    assert status == 404 and assert_openai_error(bob)["code"] == "cluster_not_found"


async def test_jobs_are_filtered_for_the_caller(gateway: Server, http: aiohttp.ClientSession) -> None:
    status, document, _ = await call(http, "GET", f"{gateway.url}/local/jobs", headers=auth("bob"))
    assert status == 200
    assert [job["Models"] for job in document["running"]] == [CHAT_MODEL, EMBED_MODEL]
    assert document["running"][0]["Model Status"] == "running"
    assert set(document) >= {"running", "queued", "stopped", "others", "cluster_status"}
    status, document, _ = await call(http, "GET", f"{gateway.url}/uni/jobs", headers=auth("bob"))
    assert status == 404
    assert assert_openai_error(document)["code"] == "cluster_not_found"
    status, document, _ = await call(http, "GET", f"{gateway.url}/uni/jobs", headers=auth("alice"))
    assert [job["Models"] for job in document["running"]] == [CHAT_MODEL]


async def test_jobs_of_unknown_cluster_is_404(gateway: Server, http: aiohttp.ClientSession) -> None:
    status, document, _ = await call(http, "GET", f"{gateway.url}/nope/jobs", headers=auth())
    assert status == 404
    assert_openai_error(document)


async def test_inference_checks_in_order(gateway: Server, http: aiohttp.ClientSession) -> None:
    base = gateway.url
    cases = [
        ("/nope/vllm/v1/chat/completions", chat(), 404, "cluster_not_found", None),
        ("/local/sglang/v1/chat/completions", chat(), 400, "unsupported_framework", None),
        (
            "/chatonly/vllm/v1/embeddings",
            {"model": EMBED_MODEL, "input": "x"},
            400,
            "unsupported_endpoint",
            None,
        ),
        ("/chatonly/sglang/v1/chat/completions", chat(), 404, "model_not_found", "model"),
        ("/local/vllm/v1/chat/completions", chat(model="no/such-model"), 404, "model_not_found", "model"),
        ("/local/vllm/v1/chat/completions", chat(model=PRIVATE_MODEL), 404, "model_not_found", "model"),
        ("/uni/vllm/v1/chat/completions", chat(), 404, "cluster_not_found", None),
    ]
    for path, body, expected, code, param in cases:
        status, document, _ = await call(http, "POST", base + path, json=body, headers=auth("bob"))
        assert status == expected, path
        assert assert_openai_error(document, param)["code"] == code


async def test_cluster_and_endpoint_permissions_pass(gateway: Server, http: aiohttp.ClientSession) -> None:
    for path, model in [("/uni", CHAT_MODEL), ("/local", PRIVATE_MODEL)]:
        url = f"{gateway.url}{path}/vllm/v1/chat/completions"
        status, document, _ = await call(http, "POST", url, json=chat(model=model), headers=auth("alice"))
        assert status == 200
        assert document["model"] == model


async def test_schema_is_checked_before_the_cluster(gateway: Server, http: aiohttp.ClientSession) -> None:
    url = f"{gateway.url}/nope/vllm/v1/chat/completions"
    status, document, _ = await call(http, "POST", url, json=chat(temperature=7), headers=auth())
    assert status == 400
    assert_openai_error(document, "temperature")


@pytest.mark.parametrize(
    "data, content_type, status, code",
    [
        (b"{not json", "application/json", 400, "invalid_json"),
        (b"", "application/json", 400, "invalid_json"),
        (b'{"model": NaN}', "application/json", 400, "invalid_json"),
        (b"\xff\xfe\xfa{}", "application/json", 400, "invalid_json"),
        (b"[" * 5000 + b"]" * 5000, "application/json", 400, "invalid_json"),
        (b"[1, 2]", "application/json", 400, "invalid_body"),
        (b'"text"', "application/json", 400, "invalid_body"),
        (b"model=x", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
        (b'{"model": "x"}', "text/plain", 415, "unsupported_media_type"),
    ],
)
async def test_malformed_bodies(
    gateway: Server, http: aiohttp.ClientSession, data: bytes, content_type: str, status: int, code: str
) -> None:
    url = f"{gateway.url}/local/vllm/v1/chat/completions"
    headers = {**auth(), "Content-Type": content_type}
    got, document, _ = await call(http, "POST", url, data=data, headers=headers)
    assert got == status
    assert assert_openai_error(document)["code"] == code


async def test_body_without_content_type_is_read_as_json(
    gateway: Server, http: aiohttp.ClientSession
) -> None:
    url = f"{gateway.url}/local/vllm/v1/chat/completions"
    body = b'{"model": "x", "messages": []}'
    status, document, _ = await call(
        http, "POST", url, data=body, headers=auth(), skip_auto_headers=["Content-Type"]
    )
    assert status == 400
    assert assert_openai_error(document, "messages")["code"] != "unsupported_media_type"


async def test_body_over_the_limit_is_413(gateway: Server, http: aiohttp.ClientSession) -> None:
    url = f"{gateway.url}/local/vllm/v1/chat/completions"
    status, document, _ = await call(http, "POST", url, json=chat("x" * 1_000_000), headers=auth())
    assert status == 413
    assert "1000000" in assert_openai_error(document)["message"]


async def test_unknown_route_and_wrong_method(gateway: Server, http: aiohttp.ClientSession) -> None:
    status, document, _ = await call(http, "GET", f"{gateway.url}/nothing/here", headers=auth())
    assert status == 404
    assert_openai_error(document)
    status, document, response = await call(
        http, "GET", f"{gateway.url}/local/vllm/v1/chat/completions", headers=auth()
    )
    assert status == 405
    assert response.headers["Allow"] == "POST"
    assert_openai_error(document)
    status, document, _ = await call(http, "POST", f"{gateway.url}/health")
    assert status == 405
    assert_openai_error(document)


async def test_path_tricks_do_not_escape_the_route(gateway: Server, http: aiohttp.ClientSession) -> None:
    for path in ["/local%2Fvllm/vllm/v1/chat/completions", "/..%2F..%2Fetc/vllm/v1/chat/completions"]:
        status, document, _ = await call(http, "POST", gateway.url + path, json=chat(), headers=auth())
        assert status in (404,), path
        assert_openai_error(document)
