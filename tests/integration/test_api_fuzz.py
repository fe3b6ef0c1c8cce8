"""Malformed and hostile input to every route of the OpenAPI document: a JSON error, never a 5xx."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dashboard.api.routes import openapi_document
from tests.conftest import Server

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
bodies = st.one_of(
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({}, optional={"target_model": json_values, "model": json_values,
                                        "messages": json_values, "stream": json_values,
                                        "wait": json_values}).map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
)
model_ids = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="/?#%"),
                    min_size=1, max_size=20)
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def operations() -> list[tuple[str, str]]:
    return [(method.upper(), path) for path, item in openapi_document()["paths"].items()
            for method in item if path not in ("/v1/events",)]  # an event stream never ends by itself


OPENAI_ROUTES = ("/v1/chat/completions", "/v1/models")  # errors in OpenAI's shape, so its clients show them


def check(response: httpx.Response, path: str) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        body = response.json()
        if path in OPENAI_ROUTES and isinstance(body["error"], dict):
            assert isinstance(body["error"]["message"], str) and isinstance(body["error"]["type"], str)
        else:  # this API's own shape (also what the connection guard answers before any route)
            assert isinstance(body["error"], str) and isinstance(body["message"], str)


@pytest.mark.parametrize(("method", "path"), operations())
@FUZZ
@given(body=bodies, model_id=model_ids, query=st.dictionaries(st.sampled_from(["target_model", "limit", "x"]),
                                                              st.text(max_size=20), max_size=2))
def test_no_input_makes_the_server_fail(server: Server, method: str, path: str, body: bytes, model_id: str,
                                        query: dict[str, str]) -> None:
    if path == "/v1/models/switch/cancel":
        return  # valid whatever the body, and cancelling other tests' switches helps no one
    url = server.url + path.replace("{model_id}", model_id)
    with httpx.Client(timeout=30) as client:
        response = client.request(method, url, content=body if method == "POST" else None, params=query,
                                  headers={**server.headers, "Content-Type": "application/json"})
    check(response, path)
