"""Process and serving helpers shared by the embedded platform's servers.

Two promises live here: (1) no child outlives the process that started it, even when that process is SIGKILLed
(PR_SET_PDEATHSIG in the child + a parent-pid watchdog thread + process groups so grandchildren go too), and
(2) every server binds 127.0.0.1 and rejects requests that lack the per-run key.
"""

from __future__ import annotations

import ctypes
import hmac
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

PR_SET_PDEATHSIG = 1
LOOPBACK = "127.0.0.1"
# Set by the control plane on hot-load requests it forwards: the snapshot dir of the deployment's trainer job.
SNAPSHOT_ROOT_HEADER = "x-cookbook-snapshot-root"


def set_pdeathsig(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send `sig` to this process when its parent thread dies. No-op where prctl is unavailable."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except OSError:
        pass


def _child_preexec() -> None:
    # Runs in the forked child before exec: PDEATHSIG survives exec for non-setuid binaries.
    set_pdeathsig(signal.SIGTERM)


def spawn(cmd: Sequence[str], log_file: str | os.PathLike, env: dict[str, str] | None = None,
          stdin: int = subprocess.DEVNULL) -> subprocess.Popen:
    """Start `cmd` as the leader of a new process group, output appended to `log_file`, dying with this process.

    PDEATHSIG fires when the *thread* that forked exits, so call this from a long-lived thread (the main thread or
    an event loop's thread), never from a short-lived worker.
    """
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    log = open(log_file, "ab")
    try:
        return subprocess.Popen(
            list(cmd), stdin=stdin, stdout=log, stderr=subprocess.STDOUT,
            env=env, preexec_fn=_child_preexec, process_group=0,
        )
    finally:
        log.close()  # the child holds its own descriptor


# ---------------------------------------------------------------------------------------------------------------
# Spare processes: a trainer or deployment started ahead of need, its slow imports done before it has a job
# ---------------------------------------------------------------------------------------------------------------

SPARE_FLAG = "--spare"


def start_spare(module: str, log_file: str | os.PathLike, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python -m <module> --spare <log_file>`: it imports what it will need, then waits for `assign_spare`. The log
    path on its command line says whose spare it is (it lies under the platform's root) to anyone scanning /proc."""
    return spawn(python_cmd(module, SPARE_FLAG, str(log_file)), log_file, env, stdin=subprocess.PIPE)


def assign_spare(proc: subprocess.Popen, cmd: Sequence[str], log_file: str | os.PathLike) -> bool:
    """Hand a waiting spare the command line it would have been started with (`python -m <module> args...`) and the
    log to write to. False when the spare cannot take it (it died, or runs another module): start `cmd` instead."""
    if proc.poll() is not None or list(cmd[1:3]) != ["-m", proc.args[2]]:
        return False
    try:
        proc.stdin.write((json.dumps({"argv": list(cmd[3:]), "log_file": str(log_file)}) + "\n").encode())
        proc.stdin.close()
    except (BrokenPipeError, ValueError):
        return False
    return True


def spare_argv(warm: Callable[[], object]) -> list[str] | None:
    """In a child's `main`: None unless started as a spare. A spare runs `warm` (the imports that are most of its
    start-up), waits for its command line on stdin, points stdout/stderr at the log it is given, and returns the
    arguments. It exits when stdin closes first (the control plane retired it or went away)."""
    if sys.argv[1:2] != [SPARE_FLAG]:
        return None
    warm()
    line = sys.stdin.readline()
    if not line:
        sys.exit(0)
    job = json.loads(line)
    fd = os.open(job["log_file"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return job["argv"]


def stop_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM the child's whole process group, then SIGKILL whatever is left after `grace_s`."""
    if proc.poll() is None:
        _killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    # Always sweep the group: the leader may be gone while its children linger.
    _killpg(proc.pid, signal.SIGKILL)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        pass


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (reads /proc, so no psutil needed)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def start_parent_watchdog(parent_pid: int | None, interval_s: float = 0.5) -> None:
    """Exit this process when `parent_pid` goes away (a backstop for PDEATHSIG, e.g. after a thread exit)."""
    if not parent_pid:
        return
    set_pdeathsig(signal.SIGTERM)

    def watch() -> None:
        while pid_alive(parent_pid) and os.getppid() != 1:
            time.sleep(interval_s)
        os.kill(os.getpid(), signal.SIGTERM)  # graceful first: servers stop their own children
        time.sleep(10)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def write_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def wait_port_file(path: str | os.PathLike, proc: subprocess.Popen | None, timeout_s: float, what: str,
                   log_file: str | os.PathLike | None = None) -> int:
    """Block until a child has written its port to `path`; fail early (with its log tail) if it dies first."""
    deadline = time.monotonic() + timeout_s
    path = Path(path)
    while time.monotonic() < deadline:
        if path.exists():
            text = path.read_text().strip()
            if text:
                return int(text)
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before it was ready.{log_tail(log_file)}")
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not become ready within {timeout_s:.0f}s.{log_tail(log_file)}")


def log_tail(log_file: str | os.PathLike | None, n_chars: int = 2000) -> str:
    if not log_file or not Path(log_file).exists():
        return ""
    text = Path(log_file).read_text(errors="replace")[-n_chars:]
    return f"\n--- last lines of {log_file} ---\n{text}"


# ---------------------------------------------------------------------------------------------------------------
# Serving
# ---------------------------------------------------------------------------------------------------------------


def request_key(headers) -> str | None:
    """The key a request carries: `X-API-Key` (tinker and Fireworks) or `Authorization: Bearer <key>`."""
    key = headers.get("x-api-key")
    if key:
        return key
    auth = headers.get("authorization", "")
    return auth[7:] if auth.lower().startswith("bearer ") else None


# The control plane's and the deployment's 401 body, Fireworks style (16: gRPC's UNAUTHENTICATED).
UNAUTHORIZED_BODY = {"error": {"code": 16, "message": "missing or invalid API key"}}


class KeyAuthMiddleware:
    """Pure ASGI middleware (works with streaming responses): 401 unless the request carries the per-run key.

    `error_body` is the JSON of that 401, in the error shape of the API the wrapped app serves.
    """

    def __init__(self, app, api_key: str, error_body: dict = UNAUTHORIZED_BODY):
        self.app = app
        self._key = api_key.encode()
        self.error_body = error_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        key = request_key(headers)
        if key is None or not hmac.compare_digest(key.encode(), self._key):
            from starlette.responses import JSONResponse
            response = JSONResponse(self.error_body, status_code=401)
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def serve(app, port: int, port_file: str | None, parent_pid: int | None,
          on_ready: Callable[[int], None] | None = None) -> None:
    """Run `app` with uvicorn on 127.0.0.1:`port` (0 = any free port); write the bound port to `port_file`.

    The socket is bound and listening before the port file appears, so a reader never races the server.
    """
    import uvicorn

    start_parent_watchdog(parent_pid)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted sockets inherit TCP_NODELAY. Without it, a keep-alive response written as headers + body stalls
    # ~40 ms on Nagle vs delayed ACK (measured: 44 ms -> 1 ms per small request on loopback).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((LOOPBACK, port))
    sock.listen(512)
    bound = sock.getsockname()[1]
    if port_file:
        write_atomic(port_file, str(bound))
    if on_ready:
        on_ready(bound)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2,
                            timeout_keep_alive=30)
    server = uvicorn.Server(config)
    server.run(sockets=[sock])


def python_cmd(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]
