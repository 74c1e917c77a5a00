"""The OpenAPI 3.1 document of the HTTP server (served at ``/v1/openapi.json``).

Request and answer schemas come from the pydantic models the server validates with, so they
cannot drift; a test checks that every route served is documented and every documented route
is served.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic.json_schema import models_json_schema

from sinks.schema import Answer, DaemonStatus, ForgetRequest, QueryRequest
from streamer import __version__

_TIME = {
    "anyOf": [{"type": "number"}, {"type": "string"}],
    "description": "Epoch seconds, ISO 8601, 'now' or relative (-15m, -2h, -30s, -1d).",
}
_ERROR = {
    "type": "object",
    "required": ["code", "message"],
    "properties": {
        "code": {"type": "string", "examples": ["invalid_request", "unknown_stream", "busy"]},
        "message": {"type": "string"},
        "id": {"type": "string"},
    },
}


def _json(ref: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): {"description": "Error", "content": _json("Error")} for s in statuses}


def _schemas() -> dict[str, Any]:
    """Every model's schema (nested ones included) under ``#/components/schemas``."""
    _, top = models_json_schema(
        [(QueryRequest, "validation"), (Answer, "serialization"),
         (ForgetRequest, "validation"), (DaemonStatus, "serialization")],
        ref_template="#/components/schemas/{model}",
    )  # fmt: skip
    schemas: dict[str, Any] = top["$defs"]
    schemas["AskRequest"] = _ask_schema(schemas.pop("QueryRequest"))
    _times(schemas["ForgetRequest"])
    schemas["Error"] = _ERROR
    return schemas


def _times(schema: dict[str, Any]) -> None:
    schema["properties"]["since"] = dict(_TIME)
    schema["properties"]["until"] = dict(_TIME)


def _ask_schema(schema: dict[str, Any]) -> dict[str, Any]:
    _times(schema)
    props = schema["properties"]
    props["stream"] = {
        "anyOf": [
            {"type": "string"},
            {"type": "array", "items": {"type": "string"}},
            {"type": "boolean"},
        ],
        "description": "A stream name, a list of names or '*' (default). A boolean is the "
        "Server-Sent Events switch (true: stream the answer) and asks about every stream.",
    }
    return schema


@cache
def openapi_document() -> dict[str, Any]:
    probe = {"application/json": {"schema": {"type": "object"}}}
    sse = {
        "text/event-stream": {
            "schema": {"type": "string"},
            "description": "event: token (data: {type, id, index, text}) for each piece of "
            "text, then one event: final (an Answer) or event: error.",
        }
    }
    paths: dict[str, Any] = {
        "/metrics": {"get": {
            "summary": "Prometheus metrics (text exposition format)",
            "responses": {"200": {"description": "Metrics",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}},
                          **_errors(401)},
        }},
        "/healthz": {"get": {
            "summary": "Liveness: the process and its device thread are alive",
            "security": [],
            "responses": {"200": {"description": "Alive", "content": probe},
                          "503": {"description": "Device thread stalled", "content": probe}},
        }},
        "/readyz": {"get": {
            "summary": "Readiness: model loaded, Redis reachable, a stream not failed",
            "security": [],
            "responses": {"200": {"description": "Ready", "content": probe},
                          "503": {"description": "Not ready", "content": probe}},
        }},
        "/v1/ask": {"post": {
            "summary": "Ask a question (the Redis request schema)",
            "parameters": [{"name": "stream", "in": "query", "required": False,
                            "schema": {"type": "boolean"},
                            "description": "true: answer with Server-Sent Events"}],
            "requestBody": {"required": True, "content": _json("AskRequest")},
            "responses": {"200": {"description": "The final answer (or an SSE stream)",
                                  "content": {**_json("Answer"), **sse}},
                          **_errors(400, 401, 404, 409, 429, 500, 503, 504)},
        }},
        "/v1/answers/{id}": {"get": {
            "summary": "A recent final answer (or its error) by request id",
            "parameters": [{"name": "id", "in": "path", "required": True,
                            "schema": {"type": "string"}}],
            "responses": {"200": {"description": "The answer", "content": _json("Answer")},
                          **_errors(400, 401, 404, 409, 429, 500, 504)},
        }},
        "/v1/status": {"get": {
            "summary": "The daemon's status snapshot",
            "responses": {"200": {"description": "Status", "content": _json("DaemonStatus")},
                          **_errors(401, 503)},
        }},
        "/v1/forget": {"post": {
            "summary": "Remove an interval from a stream's memory (and its snapshot)",
            "requestBody": {"required": True, "content": _json("ForgetRequest")},
            "responses": {"200": {"description": "Forgotten", "content": probe},
                          **_errors(400, 401, 404, 503)},
        }},
        "/v1/config/reload": {"post": {
            "summary": "Re-read the config file (as SIGHUP): streams added, removed, changed",
            "responses": {"200": {"description": "What was applied and what needs a restart",
                                  "content": probe},
                          **_errors(400, 401, 503)},
        }},
        "/frames/{stream}/{file}": {"get": {
            "summary": "An evidence frame (JPEG) an answer cites (its evidence_frames url)",
            "parameters": [{"name": "stream", "in": "path", "required": True,
                            "schema": {"type": "string"}},
                           {"name": "file", "in": "path", "required": True,
                            "schema": {"type": "string", "pattern": r"^-?\d+_-?\d+\.jpg$"}}],
            "responses": {"200": {"description": "The frame",
                                  "content": {"image/jpeg": {"schema": {"type": "string",
                                                                        "format": "binary"}}}},
                          **_errors(401, 404)},
        }},
        "/v1/openapi.json": {"get": {
            "summary": "This document",
            "responses": {"200": {"description": "OpenAPI 3.1", "content": probe},
                          **_errors(401)},
        }},
    }  # fmt: skip
    return {
        "openapi": "3.1.0",
        "info": {"title": "flashwatch", "version": __version__},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": _schemas(),
        },
        "security": [{"bearer": []}],
    }
