"""The dashboard's HTTP server: a run list, a run page, and a server-sent event stream per page.

Standard library only (`ThreadingHTTPServer`). Each open page holds one event stream
whose thread follows the store by id cursors (`StoreFollower`) and pushes what is new
every `PUSH_INTERVAL_S`, plus a summary every `SUMMARY_INTERVAL_S` (sooner on progress).
Bound to 127.0.0.1 unless told otherwise; any other address needs a token, checked on
every request (query `?token=`, then a cookie the first answer sets, or `Authorization:
Bearer`, which is how Prometheus sends one). `/metrics` is the fleet in the Prometheus
text format (`harness.dashboard.metrics`).
"""

from __future__ import annotations

import hmac
import html
import json
import re
import sqlite3
import threading
import time
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from harness.dashboard.follow import StoreFollower, StoreProblem, run_overview
from harness.dashboard.metrics import CONTENT_TYPE as METRICS_TYPE
from harness.dashboard.metrics import FleetMetrics
from harness.errors import HarnessUsageError
from runstore.schema import DB_NAME

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
PUSH_INTERVAL_S = 0.1
SUMMARY_INTERVAL_S = 1.0
PROGRESS_INTERVAL_S = 0.25  # a progress event (epoch, step) brings the summary forward
HEARTBEAT_S = 10.0
RETRY_MS = 2000
TOKEN_COOKIE = "harness_dashboard_token"
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
}


def is_run_dir(path: Path) -> bool:
    """A run directory holds (or is about to hold) a store; anything else is a runs directory."""
    return (path / DB_NAME).exists() or (path / "manifest.json").exists()


class DashboardServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path, host: str, port: int, token: str | None) -> None:
        self.root = Path(root)
        self.token = token
        self.stopping = threading.Event()
        self.metrics = FleetMetrics()
        super().__init__((host, port), DashboardHandler)

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        shown = f"[{host}]" if ":" in str(host) else host
        return f"http://{shown}:{port}"

    @property
    def url(self) -> str:
        """The page to open: the run's page when serving one run, else the run list."""
        path = f"/run/{quote(self.root.name)}/" if is_run_dir(self.root) else "/"
        query = f"?token={quote(self.token)}" if self.token else ""
        return f"{self.base_url}{path}{query}"

    def runs(self) -> dict[str, Path]:
        """Run id -> directory: the one run, or every subdirectory of the runs directory."""
        if is_run_dir(self.root):
            return {self.root.name: self.root}
        if not self.root.is_dir():
            return {}
        return {
            p.name: p
            for p in sorted(self.root.iterdir())
            if p.is_dir() and not p.is_symlink() and RUN_ID.match(p.name)  # not runs/latest
        }

    def stop(self) -> None:
        """End the event streams and the server; idempotent."""
        self.stopping.set()
        self.shutdown()
        self.server_close()
        self.metrics.close()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_dashboard(
    path: Path | str, host: str = "127.0.0.1", port: int = 0, token: str | None = None
) -> DashboardServer:
    """Serve `path` (a run directory or a directory of runs) in a background thread.

    Returns the server: `.url` to open (with the token), `.stop()` to end it (or use it as a
    context manager). Port 0 picks a free port. Binding other than loopback without a
    token is refused (`HarnessUsageError`).
    """
    if host not in LOOPBACK_HOSTS and not token:
        raise HarnessUsageError(
            f"--host: binding to {host!r} exposes the run to the network; give --token too"
        )
    try:
        server = DashboardServer(Path(path), host, port, token)
    except OSError as exc:
        raise HarnessUsageError(f"--port: cannot listen on {host}:{port}: {exc.strerror}") from exc
    threading.Thread(target=server.serve_forever, name="dashboard", daemon=True).start()
    return server


def _static(name: str) -> bytes | None:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith("."):
        return None
    resource = resources.files("harness.dashboard") / "static" / name
    return resource.read_bytes() if resource.is_file() else None


def _ago(t_s: float | None) -> str:
    if t_s is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t_s))


class DashboardHandler(BaseHTTPRequestHandler):
    server: DashboardServer
    server_version = "harness-dashboard"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the command's own output says where the page is."""

    # ------------------------------------------------------------ routing

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if not self._authorised(query):
            self._send(
                HTTPStatus.UNAUTHORIZED,
                b"401: this dashboard needs its token (and a loopback Host without one): "
                b"open the URL `harness dashboard` printed\n",
                "text/plain; charset=utf-8",
            )
            return
        parts = [p for p in url.path.split("/") if p]
        if not parts:
            self._run_list()
        elif parts[0] == "static" and len(parts) == 2:
            body = _static(parts[1])
            if body is None:
                self._not_found(url.path)
            else:
                suffix = Path(parts[1]).suffix
                self._send(
                    HTTPStatus.OK, body, STATIC_TYPES.get(suffix, "application/octet-stream")
                )
        elif parts[0] == "run" and len(parts) in (2, 3) and parts[1] in self.server.runs():
            if len(parts) == 2:
                body = _static("run.html") or b""
                self._send(HTTPStatus.OK, body, STATIC_TYPES[".html"])
            elif parts[2] == "stream":
                self._stream(self.server.runs()[parts[1]])
            else:
                self._not_found(url.path)
        elif parts == ["metrics"]:
            body = self.server.metrics.render(self.server.runs(), query.get("run"))
            self._send(HTTPStatus.OK, body, METRICS_TYPE)
        elif parts == ["api", "runs"]:
            runs = {name: run_overview(path) for name, path in self.server.runs().items()}
            self._send(HTTPStatus.OK, json.dumps(runs).encode(), "application/json")
        else:
            self._not_found(url.path)

    def _authorised(self, query: dict[str, list[str]]) -> bool:
        expected = self.server.token
        if not expected:
            # Without a token only loopback names are answered: a web page elsewhere cannot
            # reach the dashboard by pointing a DNS name at 127.0.0.1 (DNS rebinding).
            host = urlsplit(f"//{self.headers.get('Host', '')}").hostname
            return host in LOOPBACK_HOSTS
        offered = []
        offered += query.get("token", [])
        cookie = SimpleCookie(self.headers.get("Cookie", ""))
        if TOKEN_COOKIE in cookie:
            offered.append(cookie[TOKEN_COOKIE].value)
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            offered.append(auth[len("Bearer ") :])
        return any(hmac.compare_digest(o.encode(), expected.encode()) for o in offered)

    # ------------------------------------------------------------ answers

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self._token_cookie()
        self.end_headers()
        self.wfile.write(body)

    def _token_cookie(self) -> None:
        if self.server.token:
            self.send_header(
                "Set-Cookie",
                f"{TOKEN_COOKIE}={quote(self.server.token)}; Path=/; HttpOnly; SameSite=Strict",
            )

    def _not_found(self, path: str) -> None:
        body = _page("not found", f"<p class='problem'>nothing at {html.escape(path)}</p>")
        self._send(HTTPStatus.NOT_FOUND, body, STATIC_TYPES[".html"])

    def _run_list(self) -> None:
        root = self.server.root
        runs = self.server.runs()
        if not root.exists():
            content = f"<p class='problem'>{html.escape(str(root))}: no such directory</p>"
        elif not runs:
            content = (
                f"<p class='problem'>{html.escape(str(root))}: no runs yet "
                "(start one with <code>harness run</code>)</p>"
            )
        else:
            rows = []
            for name, path in reversed(runs.items()):
                info = run_overview(path)
                if "problem" in info:
                    detail = f"<td colspan='4' class='problem'>{html.escape(info['problem'])}</td>"
                else:
                    jobs = ", ".join(f"{k} {v}" for k, v in sorted(info["jobs"].items())) or "-"
                    detail = (
                        f"<td>{info['devices']}</td><td>{html.escape(jobs)}</td>"
                        f"<td>{_ago(info['t_start_s'])}</td><td>{_ago(info['t_end_s'])}</td>"
                    )
                href = f"/run/{quote(name)}/"
                link = f"<a href='{href}'>{html.escape(name)}</a>"
                rows.append(f"<tr class='run'><td>{link}</td>{detail}</tr>")
            content = (
                "<table class='runs'><tr><th>run</th><th>devices</th><th>jobs</th>"
                "<th>first job</th><th>last end</th></tr>" + "".join(rows) + "</table>"
            )
        heading = f"<h1>runs in {html.escape(str(root))}</h1>"
        self._send(HTTPStatus.OK, _page("harness runs", heading + content), STATIC_TYPES[".html"])

    # ------------------------------------------------------------ the event stream

    def _event(self, name: str, data: Any) -> None:
        payload = json.dumps(data, separators=(",", ":"), allow_nan=False, default=str)
        self.wfile.write(f"event: {name}\ndata: {payload}\n\n".encode())
        self.wfile.flush()

    def _stream(self, run_dir: Path) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self._token_cookie()
        self.end_headers()
        stopping = self.server.stopping
        try:
            self.wfile.write(f"retry: {RETRY_MS}\n\n".encode())
            try:
                follower = StoreFollower(run_dir)
            except StoreProblem as exc:
                self._event("problem", {"message": str(exc)})
                return  # the browser reconnects after RETRY_MS: the store may appear
            try:
                self._event("hello", {"run_id": run_dir.name, "t_server_s": time.time()})
                self._follow(follower, stopping)
            except sqlite3.DatabaseError as exc:  # e.g. the store was removed while shown
                self._event("problem", {"message": f"{run_dir / DB_NAME}: {exc}"})
            finally:
                follower.close()
        except (BrokenPipeError, ConnectionResetError):
            return  # the page was closed

    def _follow(self, follower: StoreFollower, stopping: threading.Event) -> None:
        last_summary = last_write = 0.0
        while not stopping.is_set():
            rows, more = follower.poll()
            if any(rows.values()):
                self._event("rows", rows)
                last_write = time.monotonic()
            if more:
                continue  # history still arriving: no pause, summary after it
            now = time.monotonic()
            since = now - last_summary
            if since >= SUMMARY_INTERVAL_S or (
                follower.progress_changed and since >= PROGRESS_INTERVAL_S
            ):
                summary = follower.summary()
                summary["finished"] = follower.run_finished()
                self._event("summary", summary)
                last_summary = last_write = now
            elif now - last_write >= HEARTBEAT_S:
                self.wfile.write(b": keep-alive\n\n")
                self.wfile.flush()
                last_write = now
            stopping.wait(PUSH_INTERVAL_S)


def _page(title: str, content: str) -> bytes:
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        "<link rel='icon' href='data:,'><link rel='stylesheet' href='/static/dashboard.css'></head>"
        f"<body><main>{content}</main></body></html>"
    ).encode()
