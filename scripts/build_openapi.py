"""Writes dashboard/api/openapi.json: the API's contract, kept beside the routes it describes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dashboard.orchestrator.states import ModelStatus

ERROR = {"$ref": "#/components/schemas/Error"}


def errors(*codes: int) -> dict[str, Any]:
    text = {400: "Bad input", 401: "Missing API key", 403: "Wrong API key", 404: "Unknown model",
            409: "Conflict (switch in progress, model not running, memory)", 413: "Body too large",
            429: "Rate limited (see Retry-After)", 502: "Engine failed"}
    return {str(c): {"description": text[c], "content": {"application/json": {"schema": ERROR}}} for c in codes}


def json_ok(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"200": {"description": description, "content": {"application/json": {"schema": schema}}}}


MODEL_PATH = {"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}
OBJ = {"type": "object"}
AUTH = (400, 401, 403)


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
                                   "estimated_load_time_seconds": {"type": "number"}}}},
                           "gpu": {"type": "object",
                                   "required": ["total_memory_gb", "used_memory_gb", "available_memory_gb"],
                                   "properties": {"total_memory_gb": {"type": "number"},
                                                  "used_memory_gb": {"type": "number"},
                                                  "available_memory_gb": {"type": "number"}}},
                           "source": {"type": "string", "enum": ["nvml", "virtual"]},
                           "active_model": {"type": "string", "nullable": True},
                           "switch": {"type": "object", "nullable": True}}},
            "SwitchRequest": {"type": "object", "required": ["target_model"],
                              "properties": {"target_model": {"type": "string"},
                                             "stream": {"type": "boolean", "default": True}}},
            "ChatRequest": {"type": "object", "required": ["model", "messages"],
                            "properties": {"model": {"type": "string"}, "stream": {"type": "boolean"},
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
                             "responses": json_ok(OBJ)}},
        "/v1/openapi.json": {"get": {"summary": "This document", "responses": {**json_ok(OBJ), **errors(401, 403)}}},
        "/v1/models/status": {"get": {"summary": "Every model's status, GPU memory, the running switch",
                                      "responses": {**json_ok({"$ref": "#/components/schemas/Status"}),
                                                    **errors(401, 403)}}},
        "/v1/models/plan": {"get": {
            "summary": "Dry run of a switch: what would be unloaded, memory before and after",
            "parameters": [{"name": "target_model", "in": "query", "required": True, "schema": {"type": "string"}}],
            "responses": {**json_ok(OBJ), **errors(*AUTH, 404)}}},
        "/v1/models/switch": {"post": {
            "summary": "Switch to a model; Server-Sent Events: stage, progress, then complete | error | cancelled",
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/SwitchRequest"}}}},
            "responses": {"200": {"description": "Event stream (or the final event as JSON with stream=false)",
                                  "content": {"text/event-stream": {"schema": {"type": "string"}},
                                              "application/json": {"schema": OBJ}}},
                          **errors(*AUTH, 404, 413, 429)}}},
        "/v1/models/switch/cancel": {"post": {"summary": "Cancel the running switch (restores unloaded models)",
                                              "responses": {**json_ok(OBJ), **errors(401, 403)}}},
        "/v1/models/{model_id}/load": action("Load a model if it fits (no unloading)"),
        "/v1/models/{model_id}/unload": action("Unload a model"),
        "/v1/models/{model_id}/sleep": action("Put a sleep-capable model to sleep (weights to host RAM)"),
        "/v1/models/{model_id}/wake": action("Wake a sleeping model"),
        "/v1/models/{model_id}/pin": action("Pin a model: never unloaded to make room"),
        "/v1/models/{model_id}/unpin": action("Unpin a model"),
        "/v1/events": {"get": {"summary": "Server-Sent Events of every state change (status + switch events)",
                               "responses": {"200": {"description": "Event stream", "content": {
                                   "text/event-stream": {"schema": {"type": "string"}}}}, **errors(401, 403)}}},
        "/v1/audit": {"get": {"summary": "The audit log, newest first",
                              "parameters": [{"name": "limit", "in": "query", "schema": {
                                  "type": "integer", "minimum": 1, "maximum": 5000}}],
                              "responses": {**json_ok(OBJ), **errors(*AUTH)}}},
        "/v1/models": {"get": {"summary": "OpenAI-compatible model list (every catalog model, with status)",
                               "responses": {**json_ok(OBJ), **errors(401, 403)}}},
        "/v1/chat/completions": {"post": {
            "summary": "OpenAI-compatible chat completions, proxied to the model's engine (streaming too)",
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/ChatRequest"}}}},
            "responses": {"200": {"description": "Completion (JSON or text/event-stream)",
                                  "content": {"application/json": {"schema": OBJ},
                                              "text/event-stream": {"schema": {"type": "string"}}}},
                          **errors(*AUTH, 404, 409, 413)}}},
    },
}

if __name__ == "__main__":
    out = Path(__file__).resolve().parent.parent / "dashboard" / "api" / "openapi.json"
    out.write_text(json.dumps(DOC, indent=1) + "\n")
    print(f"wrote {out}")
