"""RewardClient against the real reward service (one job computing, one queued, Retry-After 3 s)."""

import asyncio
import time

import pytest

from shared.local_redis import free_port
from shared.schemas import Metrics, ScoreResponse
from shared.service_client import AsyncRewardClient, RewardClient, ServiceError

DOC = "State-owned enterprise reform deepens market allocation and governance. " * 20


def structured(i: int) -> str:
    return f"<summary>summary {i} of the reform</summary>\n<outline>one; two</outline>\n<answer>{DOC[: 1200 + 37 * i]}</answer>"


def test_busy_service_is_waited_out_after_its_retry_after(reward_service):
    # 4 requests at once against one slot and one queue place: 2 are turned away, and retried after Retry-After
    wait = reward_service.limits["retry_after_s"]
    timelines: list[list[tuple[float, int]]] = [[] for _ in range(4)]

    async def one(i: int) -> ScoreResponse:
        def seen(reply, timeline=timelines[i]):
            timeline.append((time.monotonic(), reply.status_code))

        async with AsyncRewardClient(reward_service.url, reward_service.api_key, on_reply=seen) as client:
            return await client.score([(f"query {i}", [structured(j) for j in range(3)])])

    async def all_at_once():
        return await asyncio.gather(*(one(i) for i in range(4)))

    answers = asyncio.run(all_at_once())
    assert [a.groups[0].query for a in answers] == [f"query {i}" for i in range(4)]
    assert all(isinstance(a, ScoreResponse) and len(a.groups[0].results) == 3 for a in answers)
    statuses = [s for timeline in timelines for _, s in timeline]
    assert statuses.count(503) >= 1 and statuses.count(200) == 4, statuses
    for timeline in timelines:  # each 503 is followed by a retry no sooner than Retry-After
        for (busy_at, status), (next_at, _) in zip(timeline, timeline[1:]):
            assert status == 503 and next_at - busy_at >= wait - 0.05


def test_busy_retries_are_bounded(reward_service):
    def call(client: AsyncRewardClient, i: int):
        return client.score([(f"query {i}", [structured(j) for j in range(3)])])

    async def all_at_once():
        async with AsyncRewardClient(reward_service.url, reward_service.api_key, busy_retries=0) as client:
            return await asyncio.gather(*(call(client, i) for i in range(4)), return_exceptions=True)

    outcomes = asyncio.run(all_at_once())
    refused = [o for o in outcomes if isinstance(o, Exception)]
    assert refused and all(isinstance(e, ServiceError) and e.status_code == 503 for e in refused)
    assert "still busy" in str(refused[0]) and "queue" in str(refused[0])


def test_422_raises_with_the_services_message(reward_service):
    too_many = reward_service.limits["max_responses"] + 1
    with RewardClient(reward_service.url, reward_service.api_key) as client:
        with pytest.raises(ServiceError) as caught:
            client.score([("query", [structured(j) for j in range(too_many)])])
    assert caught.value.status_code == 422
    assert f"at most {reward_service.limits['max_responses']} responses per group" in str(caught.value)


def test_wrong_key_is_a_401_with_a_hint(reward_service):
    with RewardClient(reward_service.url, "wrong-key") as client, pytest.raises(ServiceError) as caught:
        client.calibrate([[None]])
    assert caught.value.status_code == 401 and "check the API key" in str(caught.value)


def test_calibrate_is_typed(reward_service):
    good = Metrics(length=300, diversity=80, professionalism=2, general_perplexity=12, domain_perplexity=10,
                   relevance_summary=0.6, relevance_document=0.5)  # fmt: skip
    worse = good.model_copy(update={"length": 100, "relevance_document": 0.2})
    with RewardClient(reward_service.url, reward_service.api_key) as client:
        answer = client.calibrate([[good, worse, None]])
    results = answer.groups[0].results
    assert [r.parsed for r in results] == [True, True, False]
    assert results[0].weight > 0 > results[1].weight and results[2].weight == -1


def test_unreachable_service_is_retried_then_raises():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with RewardClient(url, transport_retries=2) as client, pytest.raises(ServiceError) as caught:
        client.score([("query", ["text"])])
    assert caught.value.status_code is None and "unreachable" in str(caught.value)
    assert time.monotonic() - started >= 2.0  # two waits of ~1 s before giving up


def test_a_429_is_waited_out_after_retry_after_ms_and_the_answer_comes_back():
    """The judge service path (evaluation posts to it with AsyncServiceClient): 429 + retry-after-ms, then 200."""
    import asyncio
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from shared.service_client import AsyncServiceClient

    seen: list[tuple[str, str | None]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append((self.path, self.headers.get("Authorization")))
            busy = len(seen) == 1
            self.send_response(429 if busy else 200)
            if busy:
                self.send_header("retry-after-ms", "300")
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"{}" if busy else json.dumps({"echo": json.loads(body)}).encode())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    async def call():
        async with AsyncServiceClient(f"http://127.0.0.1:{server.server_port}", "k") as client:
            return await client.post("/v1/judge/batch", {"items": [1]})

    try:
        started = time.monotonic()
        assert asyncio.run(call()) == {"echo": {"items": [1]}}
        assert time.monotonic() - started >= 0.3
        assert seen == [("/v1/judge/batch", "Bearer k")] * 2
    finally:
        server.shutdown()
