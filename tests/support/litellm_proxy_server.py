"""A real LiteLLM proxy server (``litellm --config``) for the proxy test modules (extra ``proxy``).

``running_proxy`` starts one on 127.0.0.1 with a free port, a generated master
key and the local price map, with the given config and Python modules written
next to it (the session-engine hook, a ``custom_auth`` function), waits for it
with a bounded poll on readiness, and stops it on exit. ``Proxy`` sends chat
requests as a given caller and reads the hook's audit log.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.log.replay import read_log

#: Per-token prices that make one mocked call (10 prompt + 20 completion tokens) on "deep" cost $0.005.
DEEP_PRICE = "input_cost_per_token: 0.0001, output_cost_per_token: 0.0002"
#: The hook's per-session budget: two calls on "deep" spend $0.01, so the third is refused.
LIMIT_USD = 0.008

#: The config's model groups, each answering ``mock_response`` (no network).
MODEL_LIST = f"""\
model_list:
  - model_name: cheap
    litellm_params: {{model: openai/gpt-4o-mini, api_key: k-cheap, mock_response: from cheap}}
  - model_name: mid
    litellm_params: {{model: openai/gpt-4.1-mini, api_key: k-mid, mock_response: from mid}}
  - model_name: strong
    litellm_params: {{model: openai/gpt-4o, api_key: k-strong, mock_response: from strong}}
  - model_name: deep
    litellm_params: {{model: openai/o3, api_key: k-deep, mock_response: from deep, {DEEP_PRICE}}}
"""

#: The module the config loads the hook from (``litellm_settings: callbacks: session_hook.hook``).
HOOK_MODULE = f"""\
import os

from engine import Config, Tier
from engine.integrations.litellm import SessionEngineCallback
from engine.policy import Options

hook = SessionEngineCallback.create(
    {{Tier.SIMPLE: "cheap", Tier.MEDIUM: "mid", Tier.COMPLEX: "strong", Tier.REASONING: "deep"}},
    Config(enabled=True, event_log=os.environ["SESSION_ENGINE_TEST_LOG"]),
    Options(max_cost_usd={LIMIT_USD}, budget_mode="strict", deadline_s=5.0),
)
"""

#: A loaded 2-core box has been seen to take 45 s to start the proxy.
START_TIMEOUT_S = 240.0


@dataclass
class Proxy:
    url: str
    key: str
    log: Path
    #: The proxy's environment as the hook sees it (SESSION_ENGINE_SECRET, ...).
    env: Mapping[str, str] = field(default_factory=dict)

    def chat(self, session: str, model: str, text: str, *, key: str | None = None,
             body: Mapping[str, Any] | None = None) -> httpx.Response:
        """A chat request as the caller of ``key`` (default: the master key); ``session`` goes in the
        ``x-session-id`` header when given, ``body`` adds fields to the request body."""
        headers = {"Authorization": f"Bearer {key or self.key}", **({"x-session-id": session} if session else {})}
        return httpx.post(f"{self.url}/v1/chat/completions", timeout=60, headers=headers,
                          json={"model": model, "messages": [{"role": "user", "content": text}], **(body or {})})

    def records(self, session: str, tenant: str | None = None) -> list[dict[str, Any]]:
        """The audit records of a caller's ``session`` (the proxy scopes it by the caller's key):
        any caller's, or only ``tenant``'s."""
        if not self.log.exists():
            return []
        def mine(sid: str) -> bool:
            return sid == f"{tenant}:{session}" if tenant is not None else sid.endswith(":" + session)

        # The engine's reader: the proxy may be writing its last line as we read (a torn tail, skipped).
        return [r for r in read_log(self.log) if mine(str(r.get("session_id", "")))]

    def wait_for(self, what: str, ok: Callable[[], bool]) -> None:
        """Bounded poll: the success callback records cost after the response has gone out."""
        deadline = time.monotonic() + 30
        while not ok():
            assert time.monotonic() < deadline, f"proxy: timed out waiting for {what}"
            time.sleep(0.05)

    def costs(self, session: str, tenant: str | None = None) -> list[int]:
        return [r["micros"] for r in self.records(session, tenant) if r["event"] == "cost.added"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _litellm_command() -> list[str]:
    script = Path(sys.executable).with_name("litellm")
    if script.exists():
        return [str(script)]
    found = shutil.which("litellm")
    if found is None:
        pytest.fail("the litellm console script is missing: install the extra session-engine[proxy]")
    return [found]


@contextmanager
def running_proxy(root: Path, config: str, modules: Mapping[str, str],
                  env: Mapping[str, str] | None = None, workers: int = 1) -> Iterator[Proxy]:
    """A LiteLLM proxy started from ``root``: ``config`` as its config.yaml, each of ``modules``
    (name -> source) as ``<name>.py`` beside it; the hook writes its audit log to
    ``$SESSION_ENGINE_TEST_LOG``. ``env`` adds to the proxy's environment. ``workers`` > 1 runs
    ``--num_workers``, ready once every worker has said so."""
    (root / "config.yaml").write_text(config)
    for name, source in modules.items():
        (root / f"{name}.py").write_text(source)
    port, key, log = _free_port(), "sk-" + secrets.token_hex(16), root / "audit.jsonl"
    proxy_env = {**os.environ, "LITELLM_MASTER_KEY": key, "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                 "SESSION_ENGINE_SECRET": secrets.token_hex(32), "SESSION_ENGINE_TEST_LOG": str(log), **(env or {})}
    output = (root / "proxy.out").open("wb")
    process = subprocess.Popen(
        [*_litellm_command(), "--config", str(root / "config.yaml"), "--host", "127.0.0.1", "--port", str(port),
         *(["--num_workers", str(workers)] if workers > 1 else [])],
        cwd=root, env=proxy_env, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:  # bounded poll on readiness; a crashed start fails at once with its output
            if process.poll() is not None:
                pytest.fail(f"the proxy exited ({process.returncode}):\n{(root / 'proxy.out').read_text()[-3000:]}")
            try:
                if (httpx.get(f"{url}/health/readiness", timeout=2).status_code == 200
                        and _started(root / "proxy.out") >= workers):
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the proxy did not start in {START_TIMEOUT_S:.0f} s:\n"
                            f"{(root / 'proxy.out').read_text()[-3000:]}")
            time.sleep(0.2)
        yield Proxy(url, key, log, {k: proxy_env[k] for k in ("SESSION_ENGINE_SECRET", "LITELLM_MASTER_KEY")})
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        output.close()


def _started(output: Path) -> int:
    """How many uvicorn workers have finished starting (each logs it once, with its pid)."""
    return output.read_bytes().count(b"Application startup complete")


def decision(response: httpx.Response) -> tuple[str, str, str]:
    """(decision kind, model group the decision chose, group LiteLLM says served)."""
    return (response.headers.get("x-session-engine-decision", ""), response.headers.get("x-session-engine-model", ""),
            response.headers.get("x-litellm-model-group", ""))
