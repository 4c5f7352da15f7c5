"""The web server: the standard library's ``ThreadingHTTPServer`` in front of an :class:`OpenAIService`.

Routes: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions``,
``POST /v1/completions``, ``GET /health``. Streams are Server-Sent Events (``data: {...}`` blocks,
then ``data: [DONE]``) sent with chunked transfer encoding. Errors are OpenAI-shaped JSON. Each
connection has its own thread; the model runs on the service's one worker thread, which batches
the requests waiting for it (see batching.py).
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional, Tuple

from .api import ApiError, OpenAIService

log = logging.getLogger(__name__)

#: Bodies larger than this are refused (413).
MAX_BODY_BYTES = 16 * 1024 * 1024

_POST_ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}


class OpenAIRequestHandler(BaseHTTPRequestHandler):
    """One HTTP request; ``self.server.service`` answers it."""

    protocol_version = "HTTP/1.1"
    server_version = "accessory-serve"

    # -------------------------------------------------------------- sending
    def _send_json(self, status: int, body) -> None:
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_error(self, error: ApiError) -> None:
        self._send_json(error.status, error.body())

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _send_stream(self, chunks) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for chunk in chunks:
                self._write_chunk(b"data: " + json.dumps(chunk, ensure_ascii=False).encode("utf-8") + b"\n\n")
            self._write_chunk(b"data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            # the client went away: closing the generator ends the generation and frees the model
            self.close_connection = True
        except Exception as exc:  # headers are out: report in the stream, then close
            log.exception("generation failed")
            error = ApiError(f"generation failed: {exc}", status=500, type="server_error")
            try:
                self._write_chunk(b"data: " + json.dumps(error.body()).encode("utf-8") + b"\n\n")
            except OSError:
                pass
            self.close_connection = True
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    # -------------------------------------------------------------- receiving
    def _path(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/") or "/"

    def _read_body(self) -> None:
        """Read the whole body first, so that even a refused request leaves the connection clean."""
        self._raw = b""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            raise ApiError("chunked request bodies are not supported; send a Content-Length", status=411)
        length = self.headers.get("Content-Length")
        try:
            size = int(length) if length is not None else 0
        except ValueError:
            self.close_connection = True
            raise ApiError(f"bad Content-Length {length!r}") from None
        if size > MAX_BODY_BYTES:
            self.close_connection = True
            raise ApiError(f"the request body is {size} bytes; at most {MAX_BODY_BYTES}", status=413)
        self._raw = self.rfile.read(size) if size > 0 else b""

    def _json_body(self):
        if not self._raw.strip():
            raise ApiError("the request body is empty; send a JSON object", code="invalid_json")
        try:
            return json.loads(self._raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(f"the request body is not valid JSON: {exc}", code="invalid_json") from None

    def _route(self, method: str) -> Tuple[Optional[str], Optional[str]]:
        """(route kind, argument) for a known route; raises 404 / 405."""
        path = self._path()
        if path in _POST_ROUTES:
            if method != "POST":
                raise ApiError(f"{method} {path} is not allowed; use POST", status=405, code="method_not_allowed")
            return _POST_ROUTES[path], None
        if path in ("/v1/models", "/health") or path.startswith("/v1/models/"):
            if method not in ("GET", "HEAD"):
                raise ApiError(f"{method} {path} is not allowed; use GET", status=405, code="method_not_allowed")
            if path == "/health":
                return "health", None
            return ("models", None) if path == "/v1/models" else ("model", path[len("/v1/models/"):])
        raise ApiError(f"unknown route {method} {path}; this server offers GET /v1/models, "
                       f"POST /v1/chat/completions and POST /v1/completions", status=404, code="unknown_url")

    def _handle(self, method: str) -> None:
        service: OpenAIService = self.server.service
        try:
            self._read_body()
            kind, argument = self._route(method)
            if kind == "health":
                self._send_json(200, {"status": "ok"})
            elif kind == "models":
                self._send_json(200, service.models())
            elif kind == "model":
                if argument != service.model_name:
                    raise ApiError(f"the model {argument!r} does not exist; this server serves "
                                   f"{service.model_name!r}", status=404, param="model", code="model_not_found")
                self._send_json(200, service.model_card())
            else:
                result = service.complete(self._json_body(), kind)
                if isinstance(result, dict):
                    self._send_json(200, result)
                else:
                    self._send_stream(result)
        except ApiError as error:
            self._send_error(error)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:
            log.exception("request failed")
            self._send_error(ApiError(f"internal error: {exc}", status=500, type="server_error"))

    def do_GET(self):  # noqa: N802 (the standard library's names)
        self._handle("GET")

    def do_HEAD(self):  # noqa: N802
        self._handle("HEAD")

    def do_POST(self):  # noqa: N802
        self._handle("POST")

    def do_PUT(self):  # noqa: N802
        self._handle("PUT")

    def do_DELETE(self):  # noqa: N802
        self._handle("DELETE")

    def do_OPTIONS(self):  # noqa: N802
        self._handle("OPTIONS")

    def log_message(self, format, *args):  # noqa: A002 (the standard library's signature)
        if self.server.quiet:
            return
        super().log_message(format, *args)


class OpenAIServer(ThreadingHTTPServer):
    """A ``ThreadingHTTPServer`` holding the service its handlers answer with."""

    daemon_threads = True

    def __init__(self, service: OpenAIService, host: str = "127.0.0.1", port: int = 8000, quiet: bool = False):
        self.service = service
        self.quiet = quiet
        super().__init__((host, port), OpenAIRequestHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def start_in_thread(service: OpenAIService, host: str = "127.0.0.1", port: int = 0,
                    quiet: bool = True) -> Tuple[OpenAIServer, threading.Thread]:
    """Serve in a background thread (``port=0``: a free one; see ``server.url``). Stop with
    ``server.shutdown(); server.server_close()``."""
    server = OpenAIServer(service, host, port, quiet=quiet)
    thread = threading.Thread(target=server.serve_forever, name="accessory-serve", daemon=True)
    thread.start()
    return server, thread
