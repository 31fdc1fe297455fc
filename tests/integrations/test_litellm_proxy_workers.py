"""The real LiteLLM proxy with ``--num_workers 2`` on the Redis backend: one truth for every worker.

With two workers and the memory backend, "the pin splits (12 follow-ups of
one conversation: 8 served by one model group, 4 by another) and the budget splits". Here one
``litellm --config ... --num_workers 2`` (tests/support/litellm_proxy_server.py) runs the hook with
``Config(backend="redis://...")`` against a real redis-server (tests/support/redis_servers.py), and the
checks go over HTTP: the pin holds, escalation happens once, cost sums exactly, the budget refuses
consistently. Each conversation goes on until both workers have answered part of it: a second
callback in the hook module (test instrumentation, not the engine) names the answering worker's pid
in ``x-test-worker-pid``. The audit log is the Redis streams, read as ``session-engine audit`` reads
them and checked against docs/log-schema.json.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import jsonschema
import orjson
import pytest

from engine.distributed.redis_host import merged_records, open_namespace, sessions_in_redis
from engine.policy import cost_micros
from tests.log.test_audit_log_schema import SCHEMA_PATH
from tests.support.litellm_proxy_server import LIMIT_USD, MODEL_LIST, Proxy, decision, running_proxy
from tests.support.redis_servers import RedisServer

WORKERS = 2
#: A conversation stops once both workers have answered this many of its requests ...
PER_WORKER = 3
#: ... and after at most this many (the kernel hands connections to whichever worker accepts first) ...
MAX_REQUESTS = 60
#: ... sent, after the first ones, this many at once.
BURST = 4

CONFIG = MODEL_LIST + """\
litellm_settings:
  callbacks: [session_hook.hook, session_hook.worker]
"""

HOOK_MODULE = f"""\
import os

from litellm.integrations.custom_logger import CustomLogger

from engine import Config, Tier
from engine.integrations.litellm import SessionEngineCallback
from engine.policy import Options

# Every worker imports this module and points its hook at the same Redis.
hook = SessionEngineCallback.create(
    {{Tier.SIMPLE: "cheap", Tier.MEDIUM: "mid", Tier.COMPLEX: "strong", Tier.REASONING: "deep"}},
    Config(enabled=True, backend=os.environ["SESSION_ENGINE_TEST_BACKEND"]),
    Options(max_cost_usd={LIMIT_USD}, budget_mode="strict", deadline_s=5.0),
)


class WorkerPid(CustomLogger):
    \"\"\"Test instrumentation: which worker process answered.\"\"\"

    async def async_post_call_response_headers_hook(self, data, user_api_key_dict, response,
                                                    request_headers=None, litellm_call_info=None):
        return {{"x-test-worker-pid": str(os.getpid())}}


worker = WorkerPid()
"""

VALIDATOR = jsonschema.Draft202012Validator(orjson.loads(SCHEMA_PATH.read_bytes()))
#: Every answer of the module by session: what LiteLLM charged for it (``x-litellm-response-cost``).
CHARGED: dict[str, list[int]] = {}


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Proxy]:
    """One proxy with two workers for the module, both on ``redis_url``."""
    with running_proxy(tmp_path_factory.mktemp("litellm-proxy-workers"), CONFIG, {"session_hook": HOOK_MODULE},
                       env={"SESSION_ENGINE_TEST_BACKEND": redis_url}, workers=WORKERS) as proxy:
        yield proxy


def records(redis_url: str, session: str | None = None) -> list[dict[str, Any]]:
    """The audit records every worker wrote to the Redis streams (one session's, or all)."""
    client, keys = open_namespace(redis_url)
    try:
        found = list(merged_records(client, keys))
    finally:
        client.close()
    return [r for r in found if session is None or str(r.get("session_id", "")).endswith(":" + session)]


def entry(redis_url: str, session: str) -> Any:
    client, keys = open_namespace(redis_url)
    try:
        [found] = [e for sid, e in sessions_in_redis(client, keys).items() if sid.endswith(":" + session)]
    finally:
        client.close()
    return found


def costs(redis_url: str, session: str) -> list[int]:
    return [r["micros"] for r in records(redis_url, session) if r["event"] == "cost.added"]


def chat(proxy: Proxy, session: str, model: str, text: str) -> httpx.Response:
    response = proxy.chat(session, model, text)
    if response.status_code == 200:
        CHARGED.setdefault(session, []).append(cost_micros(float(response.headers["x-litellm-response-cost"])))
    return response


def worker_of(response: httpx.Response) -> int:
    return int(response.headers["x-test-worker-pid"])


def both_served(responses: list[httpx.Response]) -> bool:
    counts: dict[int, int] = {}
    for response in responses:
        counts[worker_of(response)] = counts.get(worker_of(response), 0) + 1
    return len(counts) == WORKERS and min(counts.values()) >= PER_WORKER


def converse(proxy: Proxy, session: str, model: str, texts: Iterator[str], at_least: int) -> list[httpx.Response]:
    """Requests of one conversation: ``at_least`` one after the other, then bursts of ``BURST`` at once
    until both workers answered ``PER_WORKER`` of them (bounded). One at a time, the kernel may hand every
    connection to the worker that accepted the last one (measured: 59 of 60); a burst finds it busy."""
    responses: list[httpx.Response] = []
    while len(responses) < at_least:
        responses.append(chat(proxy, session, model, next(texts)))
    with ThreadPoolExecutor(BURST) as pool:
        while not both_served(responses):
            assert len(responses) < MAX_REQUESTS, (
                f"{MAX_REQUESTS} requests, and not both workers answered {PER_WORKER}: "
                f"{sorted(worker_of(r) for r in responses)}")
            burst = [next(texts) for _ in range(BURST)]
            responses += pool.map(lambda text: chat(proxy, session, model, text), burst)
    return responses


def test_twelve_follow_ups_keep_the_pin_whichever_worker_serves(proxy: Proxy, redis_url: str):
    first = chat(proxy, "pin", "strong", "design the schema")
    assert first.status_code == 200, first.text
    assert decision(first) == ("initialize", "strong", "strong")
    follow_ups = converse(proxy, "pin", "mid", (f"now write part {i}" for i in range(99)), 12)
    assert [r.status_code for r in follow_ups] == [200] * len(follow_ups)
    # With the memory backend the worker that did not see the first request pins "mid".
    assert [decision(r) for r in follow_ups] == [("retain", "strong", "strong")] * len(follow_ups)
    assert {r.json()["choices"][0]["message"]["content"] for r in follow_ups} == {"from strong"}
    kinds = [r["kind"] for r in records(redis_url, "pin") if r["event"] == "decision.made"]
    assert kinds == ["initialize"] + ["retain"] * len(follow_ups)
    assert entry(redis_url, "pin").model == "strong"


def test_the_third_identical_request_escalates_once_across_workers(proxy: Proxy, redis_url: str):
    responses = converse(proxy, "stuck", "mid", iter(lambda: "fix the failing test", None), 6)
    served = [decision(r) for r in responses]
    assert served[:3] == [("initialize", "mid", "mid"), ("retain", "mid", "mid"), ("escalate", "strong", "strong")]
    # Once per session: the strikes each worker saw are one count, and the escalated pin holds.
    assert served[3:] == [("retain", "strong", "strong")] * (len(served) - 3)
    escalations = [r for r in records(redis_url, "stuck") if r["event"] == "session.escalated"]
    assert len(escalations) == 1
    assert entry(redis_url, "stuck").escalated is True


def test_cost_sums_exactly_and_the_budget_refuses_on_every_worker(proxy: Proxy, redis_url: str):
    served = []
    for expected in ([5_000], [5_000, 5_000]):
        served.append(chat(proxy, "spend", "deep", f"prove it, part {len(served)}"))
        assert served[-1].status_code == 200, served[-1].text
        # The success callback settles after the response: the next request must see it, on either worker.
        proxy.wait_for("the cost in Redis", lambda expected=expected: costs(redis_url, "spend") == expected)
    assert served[1].headers["x-session-engine-budget-remaining-usd"] == f"{LIMIT_USD - 0.01:.6f}"

    refused = converse(proxy, "spend", "deep", (f"once more {i}" for i in range(99)), 6)
    # A cap refused consistently, not alternately: every worker reads the same spend.
    assert [r.status_code for r in refused] == [422] * len(refused), [r.text for r in refused]
    for response in refused:
        details = response.json()["error"]["provider_specific_fields"]
        assert details["code"] == "session_budget_exceeded"
        assert details["spent_usd"] == pytest.approx(0.01)
        assert response.headers["x-session-engine-decision"] == "refuse"
    assert costs(redis_url, "spend") == [5_000, 5_000]  # no refused request reached a deployment
    assert entry(redis_url, "spend").session_cost_micros == 10_000


def test_every_answer_is_charged_once_and_the_streams_match_redis(proxy: Proxy, redis_url: str):
    """Runs last: what LiteLLM charged for each answer of the module, as the streams record it (once per
    answer, by whichever worker served it) and as the sessions in Redis hold it."""
    assert chat(proxy, "tally", "strong", "one more").status_code == 200
    charged = {session: sorted(c) for session, c in CHARGED.items()}

    def logged() -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for record in records(redis_url):
            if record["event"] == "cost.added":
                out.setdefault(record["session_id"].rsplit(":", 1)[1], []).append(record["micros"])
        return {session: sorted(c) for session, c in out.items()}

    proxy.wait_for("every answer's cost", lambda: logged() == charged)
    for record in records(redis_url):
        errors = [e.message for e in VALIDATOR.iter_errors(record)]
        assert not errors, (record, errors)
    client, keys = open_namespace(redis_url)
    try:
        held = {sid.rsplit(":", 1)[1]: e.session_cost_micros for sid, e in sessions_in_redis(client, keys).items()}
    finally:
        client.close()
    assert {session: held[session] for session in charged} == {session: sum(c) for session, c in charged.items()}
