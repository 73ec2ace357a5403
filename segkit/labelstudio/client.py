"""Label Studio's HTTP API with either kind of key, and project URLs as users copy them from the browser.

Keys: a *legacy token* (40 hex characters, sent as ``Authorization: Token <key>``) or a *personal
access token* (a JWT, which is never sent itself: it is exchanged at ``/api/token/refresh/`` for a
short-lived access token sent as ``Bearer``, refreshed again when that expires).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from collections.abc import Callable, Generator
from typing import Any

import httpx

from segkit.data.readers.files import DataError

API_KEY_ENV = "LABEL_STUDIO_API_KEY"  # the variable Label Studio's own ML backends read
_PROJECT_URL = re.compile(r"^(?P<server>https?://[^?#]+?)/projects/(?P<id>\d+)(?=$|[/?#])")


class LabelStudioError(DataError):
    """Label Studio cannot be reached, refuses the key, or answers something unusable; says what to do."""


def is_project_url(text: str) -> bool:
    """True for ``http(s)://host[:port][/prefix]/projects/<id>[/...][?...]``."""
    return bool(_PROJECT_URL.match(str(text)))


def parse_project_url(url: str) -> tuple[str, int]:
    """(server URL, project id) of a project URL as seen in the browser, e.g. ``.../projects/3/data?tab=5``."""
    m = _PROJECT_URL.match(url)
    if not m:
        raise LabelStudioError(f"{url}: not a Label Studio project URL (expected http://HOST:PORT/projects/ID)")
    return m["server"], int(m["id"])


def resolve_api_key(explicit: str | None) -> str:
    """The key given, else ``$LABEL_STUDIO_API_KEY``; raise saying where to find one when neither is set."""
    key = explicit or os.environ.get(API_KEY_ENV, "")
    if not key.strip():
        raise LabelStudioError(f"no Label Studio API key: set {API_KEY_ENV} or pass --ls-token-file (Label Studio: "
                               f"Account & Settings > Personal Access Token, or the legacy Access Token)")
    return key.strip()


def read_key_file(path: str | os.PathLike) -> str:
    """The API key in a file (``--ls-token-file``), surrounding whitespace dropped; LabelStudioError naming
    the file when it cannot be read or is empty."""
    try:
        key = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise LabelStudioError(f"{path}: cannot read the Label Studio API key ({e})") from None
    if not key:
        raise LabelStudioError(f"{path}: the key file is empty")
    return key


def key_kind(key: str) -> str:
    """``"personal access token"`` for a JWT, else ``"legacy token"``."""
    return "personal access token" if key.count(".") == 2 and key.startswith("eyJ") else "legacy token"


class ApiKeyAuth(httpx.Auth):
    """Either kind of key; a personal access token is exchanged for access tokens, refreshed on 401."""

    # False: httpx would otherwise read every response whole before the flow sees it, a download's too,
    # past any size limit; the refresh answer is read explicitly
    requires_response_body = False

    def __init__(self, server: str, key: str):
        self.server, self.key, self.kind = server, key, key_kind(key)
        self._access: str | None = None

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if origin(request.url) != origin(self.server):  # decided where the request goes, whatever spelled the URL
            yield request
            return
        if self.kind == "legacy token":
            request.headers["Authorization"] = f"Token {self.key}"
            yield request
            return
        if self._access is None:
            yield from self._refresh()
        request.headers["Authorization"] = f"Bearer {self._access}"
        response = yield request
        if response.status_code == 401 and origin(response.url) == origin(self.server):  # access tokens live minutes
            yield from self._refresh()
            request.headers["Authorization"] = f"Bearer {self._access}"
            yield request

    def _refresh(self) -> Generator[httpx.Request, httpx.Response, None]:
        response = yield httpx.Request("POST", f"{self.server}/api/token/refresh/", json={"refresh": self.key})
        response.read()
        if response.status_code != 200 or "access" not in _json_or_empty(response):
            raise LabelStudioError(unauthorized_message(self.server, self.kind, response.status_code))
        self._access = response.json()["access"]


def _same_origin_bodies(server: str) -> Callable[[httpx.Request], None]:
    """A request hook refusing any request with a body to another origin: a 307/308 redirect would carry
    it there, and the body of a token refresh is the key itself."""
    def check(request: httpx.Request) -> None:
        if request.method not in ("GET", "HEAD") and origin(request.url) != origin(server):
            raise LabelStudioError(f"refused to send a {request.method} to {redact(request.url)}: not {server}")
    return check


def unauthorized_message(server: str, kind: str, status: int = 401) -> str:
    """What a refused key means, for the kind that was tried, and how to get the other kind."""
    if kind == "legacy token":
        other = ("if you have a personal access token instead (a long key starting with 'eyJ', from Account & "
                 "Settings > Personal Access Token), use that; legacy tokens work only where the organization "
                 "enables them (Organization > API Tokens Settings)")
    else:
        other = ("the token may be revoked or from another server; create a new one in Account & Settings > "
                 "Personal Access Token, or use the legacy Access Token shown on the same page if your "
                 "organization enables legacy tokens")
    return f"Label Studio at {server} refused the API key (HTTP {status}), tried as a {kind}: {other}"


def origin(url: str | httpx.URL) -> tuple[str, str, int | None]:
    """(scheme, host, port) of a URL, default ports filled in: what decides where a key may go."""
    url = httpx.URL(str(url))
    default = {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, url.host.lower(), url.port or default


def canonical_origin(url: str | httpx.URL) -> str:
    """:func:`origin` as one string, ``scheme://host:port``: the same for every spelling of a server."""
    scheme, host, port = origin(url)
    return f"{scheme}://{host}:{port}"


def redact(url: str | httpx.URL) -> str:
    """``url`` without its query, fragment and user:password, for logs and messages: a signed storage link's
    query is a credential (``X-Amz-Signature``, ``sig``) that must not end up in a log file."""
    text = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#@]*@", r"\1", str(url))
    cut = min((i for i in (text.find("?"), text.find("#")) if i >= 0), default=len(text))
    return text[:cut] + ("?..." if cut < len(text) else "")


class Client:
    """A session with one Label Studio server: JSON calls and file downloads with the key attached.

    The key goes to the server's own origin alone (scheme, host and port: never to ``http://`` for an
    ``https://`` server); httpx drops it from redirects to other origins. ``request_hook`` runs before
    every request, redirects included (the backend's :class:`~segkit.labelstudio.egress.EgressPolicy`).
    """

    def __init__(self, server: str, api_key: str, timeout: float = 60.0, transport: httpx.BaseTransport | None = None,
                 request_hook: Callable[[httpx.Request], None] | None = None):
        self.server = server.rstrip("/")
        self.auth = ApiKeyAuth(self.server, api_key)
        hooks = [_same_origin_bodies(self.server), *([request_hook] if request_hook else [])]
        self.http = httpx.Client(base_url=self.server, auth=self.auth, timeout=timeout, transport=transport,
                                 follow_redirects=True, event_hooks={"request": hooks})

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def get_json(self, path: str, **params: Any) -> Any:
        """GET ``path`` (relative to the server) and parse JSON; raise LabelStudioError on any failure."""
        response = self.request("GET", path, params=params)
        try:
            return response.json()
        except ValueError as e:
            raise LabelStudioError(f"{self.server}{path}: answer is not JSON ({e})") from e

    def request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        """One call; 401/403/404/5xx and connection errors become LabelStudioError naming the URL."""
        try:
            response = self.http.request(method, url, **kw)
        except httpx.TransportError as e:
            raise LabelStudioError(f"cannot reach Label Studio at {self.server} ({type(e).__name__}: {e}); "
                                   f"is it running, and is the URL right?") from e
        except (httpx.HTTPError, httpx.InvalidURL, UnicodeError) as e:  # too many redirects, a malformed URL
            raise LabelStudioError(f"{redact(url)}: {type(e).__name__}: {e}") from e
        self._raise_for_status(response)
        return response

    def download(self, url: str, max_bytes: int, headers: dict | None = None, **kw: Any) -> httpx.Response:
        """GET ``url`` into memory, stopping (LabelStudioError) as soon as the body passes ``max_bytes``:
        an image is never read whole before its size is known to be sane. A 304 comes back empty.

        Asks for the bytes as stored (``identity``) and refuses compressed answers: a few hundred bytes of
        gzip or brotli can decode to gigabytes before any limit could count them.
        """
        headers = {**(headers or {}), "Accept-Encoding": "identity"}
        try:
            with self.http.stream("GET", url, headers=headers, **kw) as response:
                self._raise_for_status(response, detail=False)  # an error body is not read either
                encoding = response.headers.get("content-encoding", "identity").strip().lower()
                if encoding not in ("", "identity"):
                    raise LabelStudioError(f"{redact(url)}: refused a {encoding}-encoded answer (an image is "
                                           f"sent as it is stored)")
                declared = int(response.headers.get("content-length") or 0)
                if declared > max_bytes:
                    raise LabelStudioError(f"{redact(url)}: {declared / 2**20:.1f} MB, over the download limit "
                                           f"of {max_bytes / 2**20:.0f} MB (--max-download-mb)")
                body = bytearray()
                for chunk in response.iter_raw():
                    body += chunk
                    if len(body) > max_bytes:
                        raise LabelStudioError(f"{redact(url)}: over the download limit of "
                                               f"{max_bytes / 2**20:.0f} MB (--max-download-mb); stopped reading")
                return httpx.Response(response.status_code, headers=response.headers, content=bytes(body),
                                      request=response.request)
        except httpx.TransportError as e:
            raise LabelStudioError(f"cannot fetch {redact(url)} ({type(e).__name__}: {e})") from e
        except (httpx.HTTPError, httpx.InvalidURL, UnicodeError) as e:
            raise LabelStudioError(f"{redact(url)}: {type(e).__name__}: {e}") from e

    def _raise_for_status(self, response: httpx.Response, detail: bool = True) -> None:
        if response.status_code == 401:
            raise LabelStudioError(unauthorized_message(self.server, self.auth.kind))
        if response.status_code >= 400 and response.status_code != 304:
            raise LabelStudioError(f"{redact(response.request.url)}: HTTP {response.status_code}"
                                   + (f" {_detail(response)}" if detail else ""))

    def same_server(self, url: str) -> bool:
        """Whether an absolute URL has this server's origin (scheme, host, port): only then may the key go
        with it. ``http://`` to an ``https://`` server is another origin: the key would travel in clear."""
        return origin(url) == origin(self.server)


def _json_or_empty(response: httpx.Response) -> dict:
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _detail(response: httpx.Response) -> str:
    data = _json_or_empty(response)
    text = data.get("detail") or data.get("validation_errors") or response.text[:200]
    return str(text).strip()
