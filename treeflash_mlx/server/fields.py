"""Checking request fields, shared by the OpenAI and Anthropic endpoints: one refusal type, rendered by each API
in its own error shape."""

from __future__ import annotations

import json


class RequestError(Exception):
    """A request the server refuses: HTTP status, message, and the field it is about (OpenAI's error fields)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        """OpenAI's error object."""
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


_NAMES = {int: "an integer", float: "a number", bool: "a boolean", str: "a string", dict: "an object",
          list: "an array"}


def check(body: dict, name: str, kinds, default=None, low=None, high=None, low_open=False):
    """``body[name]`` if it has one of ``kinds`` (and lies in the bounds), ``default`` when absent or null."""
    value = body.get(name, default)
    if value is None:
        return default
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(_NAMES[k] for k in kinds)
        raise RequestError(400, f"'{name}' must be {names}, got {json.dumps(value)[:60]}", name, "invalid_type")
    if low is not None and (value <= low if low_open else value < low):
        raise RequestError(400, f"'{name}' must be {'>' if low_open else '>='} {low}, got {value}", name,
                           "invalid_value")
    if high is not None and value > high:
        raise RequestError(400, f"'{name}' must be <= {high}, got {value}", name, "invalid_value")
    return value


def sampling(body: dict, args) -> dict:
    """mlx-lm's ``make_sampler`` arguments from the request, the server's flags as defaults."""
    return dict(
        temp=float(check(body, "temperature", (int, float), args.temp, low=0)),
        top_p=float(check(body, "top_p", (int, float), args.top_p, low=0, high=1, low_open=True)),
        min_p=float(check(body, "min_p", (int, float), args.min_p, low=0, high=1)),
        top_k=check(body, "top_k", int, args.top_k, low=0),
    )


def stop_strings(body: dict, name: str) -> list[str]:
    """A non-empty string or an array of them (absent: none)."""
    stop = body.get(name)
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or any(not isinstance(s, str) or not s for s in stop):
        raise RequestError(400, f"'{name}' must be a non-empty string or an array of them", name, "invalid_value")
    return stop


def model_name(body: dict, engine) -> str:
    """The requested model, which must be the one served (404 otherwise, as OpenAI answers)."""
    model = check(body, "model", str, "default_model")
    if model not in engine.model_names:
        raise RequestError(404, f"the model '{model}' does not exist; this server serves '{engine.model_id}'",
                           "model", "model_not_found")
    return model
