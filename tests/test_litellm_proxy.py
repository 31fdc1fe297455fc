"""The session-engine callback inside a real LiteLLM proxy server, over HTTP (extra ``proxy``).

One ``litellm --config`` process per module, on 127.0.0.1 with a free port, a
generated master key, the local price map and ``mock_response`` model groups,
so nothing leaves the machine. The callback is loaded the way an operator
loads it, from ``litellm_settings: callbacks: module.instance``; it writes its
audit log to a file that the tests read.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import read_log

#: Per-token prices that make one mocked call (10 prompt + 20 completion tokens) on "deep" cost $0.005.
DEEP_PRICE = "input_cost_per_token: 0.0001, output_cost_per_token: 0.0002"
LIMIT_USD = 0.008

CONFIG = f"""\
model_list:
  - model_name: cheap
    litellm_params: {{model: openai/gpt-4o-mini, api_key: k-cheap, mock_response: from cheap}}
  - model_name: mid
    litellm_params: {{model: openai/gpt-4.1-mini, api_key: k-mid, mock_response: from mid}}
  - model_name: strong
    litellm_params: {{model: openai/gpt-4o, api_key: k-strong, mock_response: from strong}}
  - model_name: deep
    litellm_params: {{model: openai/o3, api_key: k-deep, mock_response: from deep, {DEEP_PRICE}}}
litellm_settings:
  callbacks: session_hook.hook
"""

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

    def chat(self, session: str, model: str, text: str) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.key}", **({"x-session-id": session} if session else {})}
        return httpx.post(f"{self.url}/v1/chat/completions", timeout=60, headers=headers,
                          json={"model": model, "messages": [{"role": "user", "content": text}]})

    def records(self, session: str) -> list[dict[str, Any]]:
        """The audit records of the caller's ``session`` (the proxy scopes it by the caller's key)."""
        if not self.log.exists():
            return []
        return [r for r in read_log(self.log) if str(r.get("session_id", "")).endswith(":" + session)]

    def wait_for(self, what: str, ok: Callable[[], bool]) -> None:
        """Bounded poll: the success callback records cost after the response has gone out."""
        deadline = time.monotonic() + 30
        while not ok():
            assert time.monotonic() < deadline, f"proxy: timed out waiting for {what}"
            time.sleep(0.05)

    def costs(self, session: str) -> list[int]:
        return [r["micros"] for r in self.records(session) if r["event"] == "cost.added"]


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


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """A LiteLLM proxy with the session-engine callback, started once for the module."""
    root = tmp_path_factory.mktemp("litellm-proxy")
    (root / "config.yaml").write_text(CONFIG)
    (root / "session_hook.py").write_text(HOOK_MODULE)
    port, key, log = _free_port(), "sk-" + secrets.token_hex(16), root / "audit.jsonl"
    env = {**os.environ, "LITELLM_MASTER_KEY": key, "LITELLM_LOCAL_MODEL_COST_MAP": "True",
           "SESSION_ENGINE_SECRET": secrets.token_hex(32), "SESSION_ENGINE_TEST_LOG": str(log)}
    output = (root / "proxy.out").open("wb")
    process = subprocess.Popen(
        [*_litellm_command(), "--config", str(root / "config.yaml"), "--host", "127.0.0.1", "--port", str(port)],
        cwd=root, env=env, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:  # bounded poll on readiness; a crashed start fails at once with its output
            if process.poll() is not None:
                pytest.fail(f"the proxy exited ({process.returncode}):\n{(root / 'proxy.out').read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health/readiness", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the proxy did not start in {START_TIMEOUT_S:.0f} s:\n"
                            f"{(root / 'proxy.out').read_text()[-3000:]}")
            time.sleep(0.2)
        yield Proxy(url, key, log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        output.close()


def decision(response: httpx.Response) -> tuple[str, str, str]:
    """(decision kind, model group the decision chose, group LiteLLM says served)."""
    return (response.headers.get("x-session-engine-decision", ""), response.headers.get("x-session-engine-model", ""),
            response.headers.get("x-litellm-model-group", ""))


def test_the_session_keeps_its_pinned_group_and_the_headers_say_so(proxy: Proxy):
    first = proxy.chat("pin", "strong", "design the schema")
    second = proxy.chat("pin", "mid", "now write it")
    assert first.status_code == 200 and second.status_code == 200, second.text
    assert decision(first) == ("initialize", "strong", "strong")
    assert decision(second) == ("retain", "strong", "strong")
    assert second.json()["choices"][0]["message"]["content"] == "from strong"
    assert second.headers["x-session-engine-tier"] == "COMPLEX"
    assert second.headers["x-session-engine-session-source"] == "header:x-session-id"
    # The budget applies to every session of this hook: the headers say how much of it is left.
    assert second.headers["x-session-engine-budget-limit-usd"] == f"{LIMIT_USD:.6f}"
    remaining = float(second.headers["x-session-engine-budget-remaining-usd"])
    assert 0 < remaining < LIMIT_USD


def test_a_request_without_a_session_goes_where_it_asked_and_says_so(proxy: Proxy):
    response = proxy.chat("", "strong", "hello")
    assert response.status_code == 200
    assert decision(response) == ("bypass", "strong", "strong")
    assert response.headers["x-session-engine-session-source"] == "none"


def test_the_third_identical_request_escalates_over_http(proxy: Proxy):
    served = [decision(proxy.chat("stuck", "mid", "fix the failing test")) for _ in range(3)]
    assert served == [("initialize", "mid", "mid"), ("retain", "mid", "mid"), ("escalate", "strong", "strong")]
    kinds = [r["kind"] for r in proxy.records("stuck") if r["event"] == "decision.made"]
    assert kinds == ["initialize", "retain", "escalate"]


def test_cost_is_recorded_and_an_over_budget_request_is_refused_with_422(proxy: Proxy):
    first = proxy.chat("spend", "deep", "prove it")
    assert first.status_code == 200, first.text
    assert first.headers["x-session-engine-budget-remaining-usd"] == f"{LIMIT_USD - 0.005:.6f}"
    proxy.wait_for("the first cost", lambda: proxy.costs("spend") == [5_000])
    second = proxy.chat("spend", "deep", "and the converse")
    assert second.status_code == 200  # spent $0.005 <= $0.008: served, and now over
    proxy.wait_for("the second cost", lambda: proxy.costs("spend") == [5_000, 5_000])

    refused = proxy.chat("spend", "deep", "once more")
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["type"] == "budget_exceeded"
    assert error["provider_specific_fields"]["code"] == "session_budget_exceeded"
    assert error["provider_specific_fields"]["spent_usd"] == pytest.approx(0.01)
    assert error["provider_specific_fields"]["limit_usd"] == LIMIT_USD
    assert refused.headers["x-session-engine-decision"] == "refuse"
    assert refused.headers["x-session-engine-budget-remaining-usd"] == f"{LIMIT_USD - 0.01:.6f}"
    assert proxy.costs("spend") == [5_000, 5_000]  # the refused request reached no deployment


def test_the_openai_sdk_gets_one_refusal_and_does_not_retry(proxy: Proxy):
    for text in ("one", "two"):
        assert proxy.chat("sdk", "deep", text).status_code == 200
    proxy.wait_for("both costs", lambda: proxy.costs("sdk") == [5_000, 5_000])

    client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=proxy.key, max_retries=2)
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client.chat.completions.create(model="deep", messages=[{"role": "user", "content": "three"}],
                                       extra_headers={"x-session-id": "sdk"})
    client.close()
    assert refused.value.status_code == 422
    refusals = [r for r in proxy.records("sdk") if r["event"] == "decision.made" and r["kind"] == "refuse"]
    assert len(refusals) == 1  # one call, one refusal: the SDK's two retries were not used
