"""Writes dashboard/api/openapi.json: the API's contract, kept beside the routes it describes.

It says exactly what the server accepts: a model id is a non-empty string of the catalog's id
alphabet, ``limit`` a whole number from 1 to 5000, booleans are booleans; and every answer the server
can give an operation is listed (400, 401/403, 413 and 431 for any request, then each route's own).
A schemathesis run against the served document (tests/integration/test_schema_fuzz.py) holds the two
to each other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dashboard.api.limits import MAX_HEADER_BYTES
from dashboard.config import MODEL_ID
from dashboard.orchestrator.states import ModelStatus

ERROR = {"$ref": "#/components/schemas/Error"}
# The OpenAI-compatible routes may answer in OpenAI's own error shape (what its clients show), or ours.
OPENAI_ERROR = {"anyOf": [ERROR, {"$ref": "#/components/schemas/OpenAIError"}]}


def errors(*codes: int, schema: dict[str, Any] = ERROR) -> dict[str, Any]:
    text = {400: "Bad input", 401: "Missing API key (WWW-Authenticate: Bearer)", 403: "Wrong API key",
            404: "Unknown model", 409: "Conflict (switch in progress, model not running, memory)",
            413: "Body too large (refused on its Content-Length, unread)",
            429: "Rate limited (see Retry-After)",
            431: f"Request header over {MAX_HEADER_BYTES // 1024} KB", 502: "Engine failed",
            503: "Unavailable: queued past queue_timeout_s (see Retry-After), its model could not be loaded, "
                 "the request was cut by a drain (drain_timeout_s), or the server is shutting down"}
    return {str(c): {"description": text[c], "content": {"application/json": {"schema": schema}}} for c in codes}


def json_ok(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"200": {"description": description, "content": {"application/json": {"schema": schema}}}}


# A model id as the catalog spells them (config.MODEL_ID): never empty, so never "required, but refused".
MODEL_ID_SCHEMA = {"type": "string", "minLength": 1, "pattern": MODEL_ID.pattern}
MODEL_PATH = {"name": "model_id", "in": "path", "required": True, "schema": MODEL_ID_SCHEMA}
OBJ = {"type": "object"}
# One Server-Sent Event as a client parses it: its name (``event:``) and its JSON text (``data:``).
SSE_EVENT = {"type": "object", "properties": {"event": {"type": "string"}, "data": {"type": "string"},
                                              "id": {"type": "string"}, "retry": {"type": "integer"}}}
AUTH = (400, 401, 403, 413, 431)  # what any request may get: bad input, no or wrong key, too large


def action(summary: str) -> dict[str, Any]:
    return {"post": {"summary": summary, "parameters": [MODEL_PATH],
                     "responses": {**json_ok(OBJ), **errors(*AUTH, 404, 409, 502)}}}


DOC: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "smartswitch API", "version": "1",
             "description": "Switch a GPU box between vLLM models; OpenAI-compatible chat proxy."},
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {"type": "object", "required": ["error", "message"],
                      "properties": {"error": {"type": "string"}, "message": {"type": "string"}}},
            "OpenAIError": {"type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "required": ["message"],
                "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                               "code": {"nullable": True}, "param": {"type": "string", "nullable": True}}}}},
            "Status": {"type": "object", "required": ["models", "gpu", "source", "active_model", "switch"],
                       "properties": {
                           "models": {"type": "object", "additionalProperties": {
                               "type": "object",
                               "required": ["status", "health", "size_gb", "load_progress",
                                            "estimated_load_time_seconds"],
                               "properties": {
                                   "status": {"type": "string", "enum": [s.value for s in ModelStatus]},
                                   "health": {"type": "string"}, "size_gb": {"type": "number"},
                                   "gpu_memory_used_gb": {"type": "number"},
                                   "gpu_memory_required_gb": {"type": "number"},
                                   "load_progress": {"type": "integer", "minimum": 0, "maximum": 100},
                                   "estimated_load_time_seconds": {"type": "number"},
                                   # The GPUs the model occupies now ([] when it has no engine).
                                   "gpus": {"type": "array", "items": {"type": "integer", "minimum": 0}}}}},
                           "gpu": {"type": "object",
                                   "required": ["total_memory_gb", "used_memory_gb", "available_memory_gb"],
                                   "properties": {"total_memory_gb": {"type": "number"},
                                                  "used_memory_gb": {"type": "number"},
                                                  "available_memory_gb": {"type": "number"}}},
                           "source": {"type": "string", "enum": ["nvml", "virtual"]},
                           # One entry per GPU, with the models on it.
                           "devices": {"type": "array", "items": {
                               "type": "object", "required": ["index", "total_gb", "used_gb", "free_gb", "models"],
                               "properties": {"index": {"type": "integer", "minimum": 0}, "name": {"type": "string"},
                                              "total_gb": {"type": "number"}, "used_gb": {"type": "number"},
                                              "free_gb": {"type": "number"},
                                              "models": {"type": "object",
                                                         "additionalProperties": {"type": "number"}}}}},
                           "active_model": {"type": "string", "nullable": True},
                           "switch": {"type": "object", "nullable": True},
                           # Chat requests waiting for their model (switch_on_request), per model.
                           "request_queue": {"type": "object", "additionalProperties": {"type": "integer"}},
                           "request_queue_detail": {"type": "object", "additionalProperties": {
                               "type": "object", "required": ["waiting", "oldest_wait_s", "oldest_since"],
                               "properties": {"waiting": {"type": "integer"}, "oldest_wait_s": {"type": "number"},
                                              "oldest_since": {"type": "number"}}}}}},
            "SwitchRequest": {"type": "object", "required": ["target_model"],
                              "properties": {"target_model": MODEL_ID_SCHEMA,
                                             "stream": {"type": "boolean", "default": True},
                                             "wait": {"type": "boolean", "default": True}}},
            "ChatRequest": {"type": "object", "required": ["model", "messages"],
                            "properties": {"model": MODEL_ID_SCHEMA, "stream": {"type": "boolean"},
                                           "max_tokens": {"type": "integer"},
                                           "messages": {"type": "array", "items": {
                                               "type": "object", "required": ["role", "content"],
                                               "properties": {"role": {"type": "string"},
                                                              "content": {"type": "string"}}}}}},
        },
    },
    "security": [{"bearer": []}],
    "paths": {
        "/healthz": {"get": {"summary": "Liveness (no key needed)", "security": [],
                             "responses": {**json_ok(OBJ), **errors(400, 413, 431)}}},
        "/v1/openapi.json": {"get": {"summary": "This document", "responses": {**json_ok(OBJ), **errors(*AUTH)}}},
        "/v1/models/status": {"get": {"summary": "Every model's status, GPU memory, the running switch",
                                      "responses": {**json_ok({"$ref": "#/components/schemas/Status"}),
                                                    **errors(*AUTH)}}},
        "/v1/models/plan": {"get": {
            "summary": "Dry run of a switch: what would be unloaded, memory before and after",
            "parameters": [{"name": "target_model", "in": "query", "required": True, "schema": MODEL_ID_SCHEMA}],
            "responses": {**json_ok(OBJ), **errors(*AUTH, 404)}}},
        "/v1/models/switch": {"post": {
            "summary": "Switch to a model; Server-Sent Events: stage, progress, then complete | error | cancelled",
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/SwitchRequest"}}}},
            "responses": {"200": {"description": "Event stream (or the final event as JSON with stream=false)",
                                  "content": {"text/event-stream": {"schema": SSE_EVENT},
                                              "application/json": {"schema": OBJ}}},
                          "202": {"description": "Started (wait=false): its switch_id, to follow in /v1/events",
                                  "content": {"application/json": {"schema": OBJ}}},
                          **errors(*AUTH, 404, 409, 429)}}},
        "/v1/models/switch/cancel": {"post": {"summary": "Cancel the running switch (restores unloaded models)",
                                              "responses": {**json_ok(OBJ), **errors(*AUTH)}}},
        "/v1/models/{model_id}/load": action("Load a model if it fits (no unloading)"),
        "/v1/models/{model_id}/unload": action("Unload a model"),
        "/v1/models/{model_id}/sleep": action("Put a sleep-capable model to sleep (weights to host RAM)"),
        "/v1/models/{model_id}/wake": action("Wake a sleeping model"),
        "/v1/models/{model_id}/pin": action("Pin a model: never unloaded to make room"),
        "/v1/models/{model_id}/unpin": action("Unpin a model"),
        "/v1/events": {"get": {"summary": "Server-Sent Events of every state change (status + switch events)",
                               "responses": {"200": {"description": "Event stream", "content": {
                                   "text/event-stream": {"schema": SSE_EVENT}}}, **errors(*AUTH)}}},
        "/v1/audit": {"get": {"summary": "The audit log, newest first",
                              "parameters": [{"name": "limit", "in": "query", "schema": {
                                  "type": "integer", "minimum": 1, "maximum": 5000}}],
                              "responses": {**json_ok(OBJ), **errors(*AUTH)}}},
        "/v1/models": {"get": {"summary": "OpenAI-compatible model list (every catalog model, with status)",
                               "responses": {**json_ok(OBJ), **errors(*AUTH, schema=OPENAI_ERROR)}}},
        "/v1/chat/completions": {"post": {
            "summary": "OpenAI-compatible chat completions, proxied to the model's engine (streaming too)",
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/ChatRequest"}}}},
            "responses": {"200": {"description": "Completion (JSON or text/event-stream)",
                                  "content": {"application/json": {"schema": OBJ},
                                              "text/event-stream": {"schema": SSE_EVENT}}},
                          **errors(*AUTH, 404, 409, 429, 502, 503, schema=OPENAI_ERROR)}}},
    },
}

if __name__ == "__main__":
    out = Path(__file__).resolve().parent.parent / "dashboard" / "api" / "openapi.json"
    out.write_text(json.dumps(DOC, indent=1) + "\n")
    print(f"wrote {out}")
