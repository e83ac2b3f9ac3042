"""What Fireworks will receive: the exact request sequence of `python -m cookbook.train +recipe=grpo
infra=qwen3-8b-h200`, recorded and checked against a readable golden file (tests/golden/fireworks_grpo_requests.txt).

The run goes through the real `fireworks` launcher and the official SDK, pointed at `python -m cookbook.local serve`
with a catalog that answers like Fireworks for the qwen3-8b shapes and model (backed by the embedded `local-micro`
weights; shape values are illustrative). A recording proxy in front of the control plane logs every request. Polls
that repeat while waiting are collapsed, tinker's future polls and heartbeats are left out, and ids that change per
run are replaced by placeholders. When the sequence changes on purpose, regenerate the golden file with
`COOKBOOK_UPDATE_GOLDEN=1 python -m pytest tests/test_fireworks_requests.py` and review the diff.
"""

from __future__ import annotations

import difflib
import http.client
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest

from tests.conftest import REPO

GOLDEN = Path(__file__).parent / "golden" / "fireworks_grpo_requests.txt"
SHAPE = "accounts/fireworks/trainingShapes/qwen3-8b-128k-h200"
DEPLOYMENT_SHAPE = "accounts/fireworks/deploymentShapes/qwen3-8b-128k-h200"
CATALOG = {
    "trainingShapes": [
        {"name": SHAPE, "version": "7", "baseModel": "accounts/fireworks/models/qwen3-8b",
         "trainerMode": "FULL_PARAMETER_TRAINER", "maxSupportedContextLength": 131072,
         "deploymentShapeVersion": f"{DEPLOYMENT_SHAPE}/versions/3", "acceleratorType": "NVIDIA_H200_141GB",
         "acceleratorCount": 8, "nodeCount": 1, "baseModelWeightPrecision": "bfloat16"},
        {"name": f"{SHAPE}-forward", "version": "2", "baseModel": "accounts/fireworks/models/qwen3-8b",
         "trainerMode": "FORWARD_ONLY", "maxSupportedContextLength": 131072, "acceleratorType": "NVIDIA_H200_141GB",
         "acceleratorCount": 8, "nodeCount": 1},
    ],
    "deploymentShapes": [{"name": DEPLOYMENT_SHAPE, "version": "3", "baseModel": "accounts/fireworks/models/qwen3-8b",
                          "acceleratorType": "NVIDIA_H200_141GB", "acceleratorCount": 8}],
    "modelAliases": {"accounts/fireworks/models/qwen3-8b": "local-micro"},
}
# Requests whose number depends on timing, not on what the client asks for.
UNRECORDED = ("/api/v1/retrieve_future", "/api/v1/session_heartbeat", "/api/v1/telemetry")
HOP = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "accept-encoding"}


class Recorder(http.server.ThreadingHTTPServer):
    """A reverse proxy that forwards every request to `upstream` and records (method, path, query, body)."""

    daemon_threads = True
    request_queue_size = 512  # the sampler opens ~128 connections at once; the default backlog of 5 drops SYNs

    def __init__(self, upstream: str):
        self.upstream, self.records, self.lock = urlsplit(upstream), [], threading.Lock()
        self.local = threading.local()  # one upstream connection per handler thread (a shared pool serializes)
        super().__init__(("127.0.0.1", 0), _Handler)

    def upstream_connection(self) -> http.client.HTTPConnection:
        if getattr(self.local, "conn", None) is None:
            self.local.conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=600)
        return self.local.conn

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def _forward(self):
        server: Recorder = self.server  # type: ignore[assignment]
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        with server.lock:
            server.records.append((self.command, self.path, body))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
        conn = server.upstream_connection()
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        content = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in HOP:
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _forward


# ------------------------------------------------------------------------------------------------- normalizing
_IDS = [(re.compile(r"cookbook-ref-[0-9a-f]{8}"), "cookbook-ref-<id>"),
        (re.compile(r"cookbook-[0-9a-f]{8}"), "cookbook-<id>"),
        (re.compile(r"(step|start|eval)-(\d+)-[0-9a-f]{8}\b"), r"\1-\2-<session>"),
        (re.compile(r"accounts/local/"), "accounts/<account>/"),
        (re.compile(r"/rlorTrainerJobs/local/"), "/rlorTrainerJobs/<account>/"),
        (re.compile(r"sess-[0-9a-f]+"), "<session-id>")]
# Completion fields whose values matter; the rest (prompt ids, seeds) are shown as placeholders.
_COMPLETION_VALUES = {"model", "n", "max_tokens", "temperature", "top_p", "top_k", "stream", "logprobs", "raw_output",
                      "echo", "stop", "perf_metrics_in_response"}


def _ids(text: str) -> str:
    for pattern, repl in _IDS:
        text = pattern.sub(repl, text)
    return text


def _summary(path: str, body: dict) -> dict:
    if path.startswith("/inference/"):
        return {k: (v if k in _COMPLETION_VALUES else f"<{k}>") for k, v in body.items()}
    if path.startswith("/training/"):  # the tinker data plane: which fields, and the few values that matter
        keep = {"loss_fn", "checkpoint_type", "base_model", "lora_config", "grad_accumulation_normalization",
                "path", "base_only", "type", "overwrite", "adam_params"}
        summary = {k: (v if k in keep else "...") for k, v in body.items() if k != "seq_id"}
        for key in ("forward_input", "forward_backward_input"):
            if isinstance(body.get(key), dict):
                summary[key] = {"loss_fn": body[key].get("loss_fn"), "data": "..."}
        return summary
    return body


def request_lines(records) -> list[str]:
    lines = []
    for method, raw_path, body in records:
        url = urlsplit(raw_path)
        if url.path.endswith(UNRECORDED):
            continue
        query = "&".join(f"{k}={v}" for k, v in sorted(parse_qsl(url.query)))
        line = f"{method:6} {url.path}" + (f"?{query}" if query else "")
        if body:
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = "<non-JSON body>"
            if isinstance(parsed, dict):
                parsed = _summary(url.path, parsed)
            line += "\n         " + json.dumps(parsed, sort_keys=True)
        lines.append(_ids(line))
    return _collapse(_drop_startup_probes(_collapse(lines)))


def _is_probe(line: str) -> bool:
    """The SDK's readiness probe / warm-up completion: `prompt [1, 2], max_tokens 4, temperature 0`."""
    return line.startswith("POST   /inference/v1/completions") and '"max_tokens": 4' in line and '"n"' not in line


def _drop_startup_probes(lines: list[str]) -> list[str]:
    """While a deployment is still starting, `wait_for_ready` probes it between two status reads; how many rounds
    that takes is timing, so those probes are dropped (the warm-up after each hot load stays)."""
    out = []
    for i, line in enumerate(lines):
        if (_is_probe(line) and 0 < i < len(lines) - 1 and lines[i - 1] == lines[i + 1]
                and lines[i - 1].startswith("GET    /v1/accounts/<account>/deployments/")):
            continue
        out.append(line)
    return out


def _collapse(lines: list[str]) -> list[str]:
    """Drop immediate repeats of one request (A A -> A) or of a pair (A B A B -> A B): a poll loop's rounds."""
    out: list[str] = []
    for line in lines:
        out.append(line)
        for k in (1, 2):
            if len(out) >= 2 * k and out[-k:] == out[-2 * k:-k]:
                del out[-k:]
                break
    return out


# ------------------------------------------------------------------------------------------------------ test
@pytest.fixture
def local_fireworks(tmp_path):
    """`python -m cookbook.local serve` with the Fireworks-like catalog, behind the recording proxy."""
    catalog = tmp_path / "catalog.json"
    catalog.write_text(json.dumps(CATALOG))
    proc = subprocess.Popen([sys.executable, "-m", "cookbook.local", "serve", "--catalog", str(catalog), "--root",
                             str(tmp_path / "serve")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    recorder = None
    try:
        env = {}
        for _ in range(2):
            key, _, value = proc.stdout.readline().strip().partition("=")
            env[key] = value
        assert set(env) == {"FIREWORKS_BASE_URL", "FIREWORKS_API_KEY"}, env
        recorder = Recorder(env["FIREWORKS_BASE_URL"])
        threading.Thread(target=recorder.serve_forever, daemon=True).start()
        yield recorder, env["FIREWORKS_API_KEY"]
    finally:
        if recorder is not None:
            recorder.shutdown()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_grpo_on_qwen3_8b_sends_the_golden_request_sequence(local_fireworks, tmp_path):
    recorder, api_key = local_fireworks
    env = {**os.environ, "FIREWORKS_BASE_URL": recorder.url, "FIREWORKS_API_KEY": api_key,
           "FIREWORKS_POLL_INTERVAL_S": "0.2", "PYTHONUNBUFFERED": "1"}
    # Two local deviations, neither of which changes what is sent: the tokenizer (Qwen/Qwen3-8B needs the hub) is the
    # embedded model's, and the reward varies with the completion's length, so that the untrained embedded model's
    # groups carry signal and the step trains (with exact match they all score 0 and the step is skipped).
    (tmp_path / "varied_reward.py").write_text("def reward(text, row):\n    return float(len(text) % 2)\n")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-m", "cookbook.train", "+recipe=grpo", "infra=qwen3-8b-h200",
                             "max_steps=1", "tokenizer_model=local-micro", "recipe.reward_fn=varied_reward:reward",
                             f"log_path={tmp_path}/run"], capture_output=True, text=True, cwd=REPO, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = request_lines(recorder.records)
    text = "\n".join(lines) + "\n"
    if os.environ.get("COOKBOOK_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(HEADER + text)

    # What must hold whatever else changes (the golden file shows the rest).
    creates = [json.loads(line.split("\n", 1)[1]) for line in lines if line.startswith("POST   /v1/accounts/<account>/rlorTrainerJobs?")]
    assert len(creates) == 1, "GRPO with kl_beta=0 needs no reference trainer"
    assert creates[0]["trainingConfig"]["learningRate"] == 3e-4 and "maxContextLength" not in creates[0]["trainingConfig"]
    [deployment] = [json.loads(line.split("\n", 1)[1]) for line in lines
                    if line.startswith("POST   /v1/accounts/<account>/deployments?")]
    assert deployment["deploymentShape"] == f"{DEPLOYMENT_SHAPE}/versions/3" and "acceleratorType" not in deployment
    stops = [json.loads(line.split("\n", 1)[1]).get("stop") for line in lines if "/inference/v1/completions" in line]
    assert any(stops) and all(isinstance(s, str) for stop in stops if stop for s in stop)
    saves = [json.loads(line.split("\n", 1)[1])["path"] for line in lines if "/save_weights_for_sampler" in line]
    loads = [json.loads(line.split("\n", 1)[1])["identity"] for line in lines if line.startswith("POST   /hot_load/")]
    assert loads and loads == saves[:len(loads)], "every hot load loads the snapshot just saved"
    assert any(line.endswith("/api/v1/optim_step") or "/api/v1/optim_step\n" in line for line in lines)

    expected = GOLDEN.read_text().split(HEADER, 1)[-1]
    diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True), "golden", "recorded"))
    assert not diff, f"the request sequence changed (regenerate with COOKBOOK_UPDATE_GOLDEN=1 if intended):\n{diff}"


HEADER = """\
# What `python -m cookbook.train +recipe=grpo infra=qwen3-8b-h200 max_steps=1` sends to Fireworks, in order.
# Recorded by tests/test_fireworks_requests.py (the official SDK against `python -m cookbook.local serve` answering
# as Fireworks would). Each entry: METHOD path?query, then the JSON body on the next line. Repeated polls are
# collapsed to one round; tinker future polls, heartbeats and the readiness probes of a deployment that is still
# starting are omitted; per-run ids are placeholders.
# Data-plane bodies (/training/...) show their fields and the values that matter; "..." elides tensors.

"""
