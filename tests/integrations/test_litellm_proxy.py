"""The session-engine callback inside a real LiteLLM proxy server, over HTTP (extra ``proxy``).

One ``litellm --config`` process per module (tests/support/litellm_proxy_server.py), on
127.0.0.1 with a free port, a generated master key, the local price map and
``mock_response`` model groups, so nothing leaves the machine. The callback is
loaded the way an operator loads it, from ``litellm_settings: callbacks:
module.instance``; it writes its audit log to a file that the tests read.
"""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.support.litellm_proxy_server import HOOK_MODULE, LIMIT_USD, MODEL_LIST, Proxy, decision, running_proxy

CONFIG = MODEL_LIST + """\
litellm_settings:
  callbacks: session_hook.hook
"""


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """A LiteLLM proxy with the session-engine callback, started once for the module."""
    with running_proxy(tmp_path_factory.mktemp("litellm-proxy"), CONFIG, {"session_hook": HOOK_MODULE}) as proxy:
        yield proxy


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
