"""RFC 9457 problem details for every error the API returns.

Errors are mapped in one place: the core's usage errors and the gateway's errors carry
``status_hint``, and :func:`install` registers one handler that turns any of them into
a problem document with that status and the error's own sentence as ``detail``.
"""

from __future__ import annotations

import logging
import sqlite3
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.schemas import Problem
from app.dmq.errors import DmqUsageError
from app.gateway.errors import GatewayError

PROBLEM_JSON = "application/problem+json"

TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    500: "Internal Server Error",
    503: "Service Unavailable",
}

#: FastAPI answers 400 to a JSON body it cannot even decode (not UTF-8, say).
UNREADABLE_BODY: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "description": "the body could not be read as JSON"}
}

#: Schemas FastAPI adds for its own 422 body, which this API never sends.
_FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")


class ProblemError(Exception):
    """An error of HTTP itself (authentication, media type), raised by the API layer;
    what the gateway refuses comes as its own errors."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        type_: str = "about:blank",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.type = type_
        self.headers = headers


def problem(
    request: Request,
    status: int,
    detail: str,
    *,
    type_: str = "about:blank",
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": type_,
        "title": TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        "instance": request.url.path,
    }
    if errors is not None:
        body["errors"] = errors
    return JSONResponse(
        jsonable_encoder(body), status_code=status, media_type=PROBLEM_JSON, headers=headers
    )


log = logging.getLogger("dmq.api")


def store_failed(request: Request, exc: sqlite3.Error) -> JSONResponse:
    """A 503 for a request the state store could not commit (the database locked by
    another process past the busy time-out, the disk full): the client may try again,
    and the operator finds the cause in the log rather than a bare 500."""
    log.error("%s %s: the state store failed: %s", request.method, request.url.path, exc)
    return problem(
        request,
        503,
        f"the gateway's state store could not commit ({exc}); try again",
        headers={"Retry-After": "1"},
    )


def install(app: FastAPI) -> None:
    @app.exception_handler(ProblemError)
    async def _problem(request: Request, exc: ProblemError) -> JSONResponse:
        return problem(request, exc.status, exc.detail, type_=exc.type, headers=exc.headers)

    async def _refused(request: Request, exc: Exception) -> JSONResponse:
        status: int = getattr(exc, "status_hint", 500)
        return problem(request, status, str(exc))

    app.add_exception_handler(DmqUsageError, _refused)
    app.add_exception_handler(GatewayError, _refused)

    @app.exception_handler(sqlite3.Error)
    async def _store(request: Request, exc: sqlite3.Error) -> JSONResponse:
        return store_failed(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        headers = dict(exc.headers) if exc.headers else None
        return problem(request, exc.status_code, detail, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {
                "loc": list(error.get("loc", ())),
                "msg": str(error.get("msg", "")),
                "type": str(error.get("type", "")),
            }
            for error in exc.errors()
        ]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(part) for part in first["loc"])
        return problem(
            request,
            422,
            f"{where}: {first['msg']}" if where else str(first["msg"]),
            errors=errors,
        )


def document_problems(schema: dict[str, Any]) -> dict[str, Any]:
    """Make the OpenAPI document say what the handlers above really send.

    Every error response (4xx, 5xx) is ``application/problem+json`` with the Problem
    schema (FastAPI would document ``application/json``, and its own 422 body), and
    every operation that declares a security requirement documents its 401.
    """
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.setdefault(
        "Problem", Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    )
    problem_content = {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            responses: dict[str, Any] = operation.setdefault("responses", {})
            if operation.get("security"):
                responses.setdefault(
                    "401",
                    {
                        "description": "missing or wrong API token",
                        "headers": {
                            "WWW-Authenticate": {
                                "description": "always Bearer",
                                "schema": {"type": "string"},
                            }
                        },
                    },
                )
            for code, response in responses.items():
                if not (code.isdigit() and int(code) >= 400):
                    continue
                response["content"] = dict(problem_content)
                if code == "422" and response.get("description") == "Validation Error":
                    response["description"] = (
                        "the request is not valid; errors says which field and why"
                    )
            operation["responses"] = dict(sorted(responses.items()))
    for name in _FASTAPI_VALIDATION_SCHEMAS:
        components.pop(name, None)
    return schema
