"""A thin client for the providers' JSON management APIs: auth, retries, errors, models."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

from pydantic import BaseModel, ValidationError

from .errors import (
    ApiError,
    AuthError,
    MalformedResponseError,
    NotFoundError,
    RequestRejectedError,
    TransientError,
    UsageError,
)
from .models import describe
from .net import retry_after_seconds, transient_status
from .redact import Redactor, redact_url
from .retry import RetryPolicy, retrying
from .wire import HttpClient

M = TypeVar("M", bound=BaseModel)

_MAX_SHOWN = 300
# A page of a listing is at most a few megabytes; anything past this is not an answer we want.
MAX_ANSWER = 64 << 20


def path_segment(value: str) -> str:
    """``value`` as one segment of an API path. An id given on the command line that is not
    valid UTF-8 (Python keeps its bytes as surrogates) goes as those bytes, for the API to judge
    as any id it does not know; encoding it strictly was an internal error."""
    return quote(value, safe="", errors="surrogateescape")


class ApiClient:
    """GETs JSON from one API with one key, which never leaves the Authorization header."""

    def __init__(
        self,
        http: HttpClient,
        base_url: str,
        *,
        api_key: str,
        auth_scheme: str,
        key_hint: str,
        retry: RetryPolicy,
        secrets: Iterable[str] = (),
    ) -> None:
        self._http = http
        self._base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"{auth_scheme} {api_key}", "Accept": "application/json"}
        self._key_hint = key_hint
        self._retry = retry
        # An error's text is cut short here, before the CLI's redactor sees it: a key the server
        # quotes across the cut would no longer match it, and its start would be shown.
        self._redact = Redactor([api_key, *secrets])

    def said(self, text: str) -> str:
        """What the server said in an answer (an error's message), as a message shows it: its
        secrets removed, and cut short."""
        return self._redact.head(text, _MAX_SHOWN)

    @property
    def retry(self) -> RetryPolicy:
        """How its requests are retried: for a caller that asks again itself."""
        return self._retry

    async def get(
        self,
        path: str,
        model: type[M],
        *,
        what: str,
        params: Mapping[str, str | int] | None = None,
        retried: bool = True,
    ) -> M:
        """GET ``path`` and parse it as ``model``; ``what`` names the request in errors.

        ``retried=False``: one attempt, for a request asked for ahead that its caller asks for
        again, with retries, once it is wanted.
        """
        return await self._request("GET", path, model, what, params=params, retried=retried)

    async def post(
        self,
        path: str,
        model: type[M],
        *,
        what: str,
        payload: Mapping[str, Any],
        retried: bool = True,
    ) -> M:
        """POST ``payload`` as JSON and parse the answer as ``model``.

        Only for reads that travel by POST (GraphQL queries): like a GET, it is retried (unless
        ``retried=False``, as for `get`).
        """
        return await self._request("POST", path, model, what, payload=payload, retried=retried)

    async def _request(
        self,
        method: str,
        path: str,
        model: type[M],
        what: str,
        *,
        params: Mapping[str, str | int] | None = None,
        payload: Mapping[str, Any] | None = None,
        retried: bool = True,
    ) -> M:
        url = f"{self._base_url}{path}"
        if params:
            url += ("&" if "?" in url else "?") + urlencode(
                params, quote_via=quote, errors="surrogateescape"
            )
        headers = self._headers
        body = b""
        if payload is not None:
            headers = {**headers, "Content-Type": "application/json"}
            body = json.dumps(payload).encode()

        async def attempt() -> M:
            async with self._http.request(
                url, headers, method=method, body=body, what=what
            ) as resp:
                answer = await resp.read(MAX_ANSWER + 1)
                self._raise_for_status(resp.status, resp.headers, answer, what)
            if len(answer) > MAX_ANSWER:
                raise MalformedResponseError(f"{what}: the answer is larger than 64 MiB")
            return _parse(answer, model, what)

        return await retrying(self._retry if retried else replace(self._retry, attempts=1), attempt)

    def _raise_for_status(
        self, status: int, headers: Mapping[str, str], body: bytes, what: str
    ) -> None:
        if status < 300:
            return
        if status < 400:
            if status != 304 and (location := headers.get("location")):
                # Redirects are not followed (the key would go along): the configured URL is
                # wrong.
                raise UsageError(
                    f"{what}: the API redirected (HTTP {status}) to {redact_url(location)}; "
                    "check its URL"
                )
            # A 304 answers a conditional request, which we never send, and a 3xx without a
            # Location leads nowhere: neither says the URL is wrong.
            raise ApiError(f"{what}: unexpected answer (HTTP {status}) from the API")
        if status in (401, 403):
            raise AuthError(
                f"{what}: the API refused the key (HTTP {status}); check {self._key_hint}"
            )
        if status == 404:
            raise NotFoundError(f"{what}: not found (HTTP 404)")
        if status == 422:
            detail = _detail(body, self.said)
            raise RequestRejectedError(f"{what}: the API rejected the request: {detail}")
        if transient_status(status):
            raise TransientError(
                f"{what}: HTTP {status} from the API", retry_after=retry_after_seconds(headers)
            )
        raise ApiError(f"{what}: HTTP {status} from the API: {_detail(body, self.said)}")


def _parse(body: bytes, model: type[M], what: str) -> M:
    # RFC 8259 lets a parser ignore a UTF-8 byte order mark, as Python's json, requests and httpx
    # do; pydantic's parser takes it for a character that is not JSON.
    body = body.removeprefix(b"\xef\xbb\xbf")
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        if body.lstrip()[:1] not in (b"{", b"["):
            raise MalformedResponseError(
                f"{what}: the API answered with something not JSON"
            ) from exc
        raise MalformedResponseError(
            f"{what}: unexpected API answer ({describe(exc, 'body')})"
        ) from exc


def _detail(body: bytes, said: Callable[[str], str]) -> str:
    """The server's own explanation, from FastAPI-style ``detail`` or any short text, as
    ``said`` shows it (`ApiClient.said`)."""
    try:
        payload: Any = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, or nested past what Python parses
        return said(body.decode("utf-8", "replace").strip()) or "(no message)"
    detail = payload.get("detail", payload) if isinstance(payload, dict) else payload
    if isinstance(detail, list):
        detail = "; ".join(
            str(item.get("msg", item)) if isinstance(item, dict) else str(item) for item in detail
        )
    return said(str(detail))
