"""Errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, or in
Anthropic's, {"type": "error", "error": {"type", "message"}}, on Anthropic's routes."""
from __future__ import annotations

from fastapi.responses import JSONResponse

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                404: "not_found_error", 408: "invalid_request_error",
                405: "invalid_request_error", 413: "invalid_request_error",
                501: "not_supported_error",
                503: "service_unavailable"}
_ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                          403: "permission_error", 404: "not_found_error",
                          408: "invalid_request_error", 413: "invalid_request_error",
                          429: "rate_limit_error", 503: "overloaded_error"}
ANTHROPIC_ROUTES = "/v1/messages"  # the prefix of the routes whose errors are Anthropic's


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


def printable(text: str, limit: int = 200) -> str:
    """Client-supplied text made safe to log or echo: no lone surrogates (which cannot be
    encoded), no raw newlines or control characters (which could forge log lines), and
    at most `limit` characters."""
    shown = text[:limit].encode("utf-8", "backslashreplace").decode("utf-8")
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in shown)
    return shown + ("..." if len(text) > limit else "")


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": printable(message, 2000),
                      "type": _ERROR_TYPES.get(status, "server_error"),
                      "param": None if param is None else printable(param), "code": status}}


def anthropic_error_body(status: int, message: str) -> dict:
    return {"type": "error", "error": {"type": _ANTHROPIC_ERROR_TYPES.get(status, "api_error"),
                                       "message": printable(message, 2000)}}


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None, path: str = "") -> JSONResponse:
    """`path`: the request's, which picks the shape (Anthropic's clients read only theirs)."""
    body = (anthropic_error_body(status, message) if path.startswith(ANTHROPIC_ROUTES)
            else error_body(status, message, param))
    return JSONResponse(body, status_code=status, headers=headers)
