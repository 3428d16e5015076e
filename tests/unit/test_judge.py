"""Unit tests for sama.eval.judge against a loopback server speaking the OpenAI chat completions API."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from sama.eval.judge import (
    RUBRICS,
    Judge,
    JudgeConfig,
    JudgeItem,
    JudgeResult,
    ReplyError,
    parse_reply,
    sample_frames,
)

SECRET = "sk-test-7f3a9c1e5b2d"


@dataclass
class Reply:
    """What the fake server answers one request with."""

    content: str | None = None
    status: int = 200
    # A raw JSON body (an error body); default: a chat.completion carrying ``content``.
    body: dict | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


@dataclass
class Request:
    path: str
    headers: dict[str, str]  # names lower-cased
    body: dict


def scores_reply(media: str = "video", **values: int) -> Reply:
    """A reply carrying a JSON object with IF/VQ/CP(/MC) (defaults 9, 9, 9, 8)."""
    base = {"IF": 9, "VQ": 9, "CP": 9, "MC": 8} if media == "video" else {"IF": 9, "VQ": 9, "CP": 9}
    base.update(values)
    return Reply(content=json.dumps(base))


def completion(content: str | None, model: str) -> dict:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }


class FakeChatServer:
    """POST /v1/chat/completions on 127.0.0.1; ``responder(body, index)`` -> :class:`Reply`, where
    ``index`` counts requests from 0. Records every request and the most requests in flight at once."""

    def __init__(self):
        self.requests: list[Request] = []
        self.responder: Callable[[dict, int], Reply] = lambda body, index: scores_reply()
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                headers = {name.lower(): value for name, value in self.headers.items()}
                with fake._lock:
                    index = len(fake.requests)
                    fake.requests.append(Request(self.path, headers, body))
                    fake._in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake._in_flight)
                try:
                    if self.path != "/v1/chat/completions":
                        reply = Reply(status=404, body={"error": {"message": f"no route {self.path}"}})
                    else:
                        reply = fake.responder(body, index)
                    time.sleep(reply.delay_s)
                finally:
                    with fake._lock:
                        fake._in_flight -= 1
                payload = reply.body if reply.body is not None else completion(reply.content, body["model"])
                data = json.dumps(payload).encode()
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def reset(self, responder: Callable[[dict, int], Reply]) -> None:
        with self._lock:
            self.requests.clear()
            self.max_in_flight = 0
        self.responder = responder

    def start(self) -> FakeChatServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(scope="module")
def server():
    fake = FakeChatServer().start()
    yield fake
    fake.stop()


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    return SECRET


def judge_cfg(server: FakeChatServer, **overrides) -> JudgeConfig:
    cfg = JudgeConfig(enabled=True, base_url=server.base_url, model="judge-vlm", timeout_s=5.0, max_retries=0)
    for name, value in overrides.items():
        setattr(cfg, name, value)
    cfg.validate()
    return cfg


def clip(frames: int = 9, height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


def images_of(request: Request) -> list[str]:
    """The image URLs of a request's user message, in order."""
    user = next(m for m in request.body["messages"] if m["role"] == "user")
    return [part["image_url"]["url"] for part in user["content"] if part["type"] == "image_url"]


def text_of(request: Request) -> str:
    user = next(m for m in request.body["messages"] if m["role"] == "user")
    return "\n".join(part["text"] for part in user["content"] if part["type"] == "text")


def decode_data_url(url: str) -> np.ndarray:
    header, encoded = url.split(",", 1)
    assert header == "data:image/png;base64"
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))))


# --------------------------------------------------------------------------------------------
# Parsing


@pytest.mark.parametrize(
    ("text", "media", "expected"),
    [
        ('{"IF": 9, "VQ": 8, "CP": 7, "MC": 6}', "video", {"if": 9, "vq": 8, "cp": 7, "mc": 6}),
        # Prose and a ``` fence around the object; extra fields are ignored.
        (
            'Here you go:\n```json\n{"IF": 10, "VQ": 9.0, "CP": 1, "MC": 2, "reason": "ok"}\n```\nDone.',
            "video",
            {"if": 10, "vq": 9, "cp": 1, "mc": 2},
        ),
        # Keys in any case; a brace in prose before the object is skipped.
        ('Scores {see below}: {"if": 3, "vq": 4, "cp": 5}', "image", {"if": 3, "vq": 4, "cp": 5}),
        # An image ignores an MC that is present anyway.
        ('{"IF": 9, "VQ": 9, "CP": 9, "MC": 1}', "image", {"if": 9, "vq": 9, "cp": 9}),
    ],
)
def test_parse_reply_reads_the_first_json_object(text, media, expected):
    assert parse_reply(text, media) == expected


@pytest.mark.parametrize(
    ("text", "media", "reason"),
    [
        ("", "video", "empty reply"),
        (None, "video", "empty reply"),
        ("IF is 9, VQ is 8", "video", "no JSON object"),
        ('{"IF": 9, "VQ": 9, "CP": 9}', "video", "no MC field"),
        ('{"IF": 11, "VQ": 9, "CP": 9, "MC": 9}', "video", "IF=11 is outside 1-10"),
        ('{"IF": 0, "VQ": 9, "CP": 9}', "image", "IF=0 is outside 1-10"),
        ('{"IF": 8.5, "VQ": 9, "CP": 9}', "image", "IF is 8.5, not an integer"),
        ('{"IF": "9", "VQ": 9, "CP": 9}', "image", "IF is '9', not an integer"),
        ('{"IF": true, "VQ": 9, "CP": 9}', "image", "IF is True, not an integer"),
        # The FIRST object counts, even when a later one would do.
        ('{"note": 1} {"IF": 9, "VQ": 9, "CP": 9}', "image", "no IF field"),
    ],
)
def test_parse_reply_rejects_unusable_replies(text, media, reason):
    with pytest.raises(ReplyError, match=reason):
        parse_reply(text, media)


def test_sample_frames_spreads_evenly_and_keeps_short_clips():
    frames = np.arange(9)[:, None, None, None] * np.ones((1, 2, 2, 3), dtype=np.uint8)
    assert sample_frames(frames, 4)[:, 0, 0, 0].tolist() == [0, 3, 5, 8]
    assert sample_frames(frames, 1)[:, 0, 0, 0].tolist() == [0]
    assert len(sample_frames(frames[:3], 4)) == 3


# --------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"base_url": None}, "judge.base_url"),
        ({"model": ""}, "judge.model"),
        ({"rubric": "nope"}, "judge.rubric"),
        ({"runs": 0}, "judge.runs"),
        ({"response_format": "xml"}, "judge.response_format"),
        ({"concurrency": 0}, "judge.concurrency"),
        ({"image_format": "gif"}, "judge.image_format"),
    ],
)
def test_judge_config_validate(overrides, message):
    cfg = JudgeConfig(enabled=True, base_url="http://localhost:8000/v1", model="m")
    cfg.validate()
    for name, value in overrides.items():
        setattr(cfg, name, value)
    with pytest.raises(ValueError, match=message):
        cfg.validate()


def test_a_disabled_judge_needs_no_endpoint():
    JudgeConfig().validate()


# --------------------------------------------------------------------------------------------
# Requests and results


def test_video_request_sends_sampled_frames_as_data_urls_and_scores(server):
    server.reset(lambda body, index: scores_reply(IF=9, VQ=8, CP=7, MC=6))
    cfg = judge_cfg(server, runs=1, frames=3, image_side=32, max_tokens=100, temperature=0.5)
    source, edited = clip(9, 48, 64, seed=1), clip(9, 48, 64, seed=2)
    with Judge(cfg) as judge:
        result = judge.score(source, edited, "Make the sky purple.", "video")
    assert result == JudgeResult(
        scores={"if": 9.0, "vq": 8.0, "cp": 7.0, "mc": 6.0},
        runs=[{"if": 9, "vq": 8, "cp": 7, "mc": 6}],
        error=None,
        failed_runs=0,
    )
    (request,) = server.requests
    body = request.body
    assert request.path == "/v1/chat/completions"
    assert body["model"] == "judge-vlm" and body["temperature"] == 0.5 and body["max_tokens"] == 100
    assert body["response_format"] == {"type": "json_object"}
    assert body["messages"][0]["role"] == "system" and "Motion Consistency" in body["messages"][0]["content"]
    urls = images_of(request)
    # 3 frames of the source, then 3 of the edit, each downscaled to a 32-pixel longest side.
    assert len(urls) == 6
    decoded = [decode_data_url(url) for url in urls]
    assert all(image.shape == (24, 32, 3) for image in decoded)
    expected_first = np.asarray(Image.fromarray(source[0]).resize((32, 24), Image.Resampling.BICUBIC))
    assert np.abs(decoded[0].astype(int) - expected_first.astype(int)).mean() < 8
    assert np.abs(decoded[0].astype(int) - decoded[3].astype(int)).mean() > 30  # source vs edit
    text = text_of(request)
    assert "Make the sky purple." in text and '"MC"' in text


def test_image_request_sends_two_images_and_asks_no_mc(server):
    server.reset(lambda body, index: scores_reply("image", IF=10, VQ=9, CP=8))
    with Judge(judge_cfg(server, runs=1)) as judge:
        result = judge.score(clip(1), clip(1, seed=3)[0], "Remove the cat.", "image")
    assert result.scores == {"if": 10.0, "vq": 9.0, "cp": 8.0} and result.error is None
    (request,) = server.requests
    assert len(images_of(request)) == 2
    assert '"IF"' in text_of(request) and '"MC"' not in text_of(request)


def test_runs_are_averaged_and_run_concurrently_within_the_bound(server):
    per_request = [(9, 9, 9, 8), (7, 8, 9, 10), (8, 10, 6, 9), (10, 7, 8, 7)]

    def responder(body, index):
        values = dict(zip(("IF", "VQ", "CP", "MC"), per_request[index], strict=True))
        return Reply(content=json.dumps(values), delay_s=0.15)

    server.reset(responder)
    with Judge(judge_cfg(server, runs=4, concurrency=2)) as judge:
        result = judge.score(clip(), clip(seed=1), "Swap the car for a bus.", "video")
    assert result.failed_runs == 0 and result.error is None
    assert sorted(tuple(run.values()) for run in result.runs) == sorted(per_request)
    assert result.scores == pytest.approx({"if": 8.5, "vq": 8.5, "cp": 8.0, "mc": 8.5})
    assert len(server.requests) == 4
    assert server.max_in_flight == 2


def test_score_many_keeps_order_and_bounds_concurrency_overall(server):
    wanted = {"first": 3, "second": 6, "third": 9}

    def responder(body, index):
        text = json.dumps(body["messages"][1]["content"])
        name = next(n for n in wanted if f"Edit {n}" in text)
        return Reply(content=json.dumps({"IF": wanted[name], "VQ": 5, "CP": 5}), delay_s=0.05)

    server.reset(responder)
    items = [JudgeItem(clip(1), clip(1, seed=1), f"Edit {name}.", "image") for name in wanted]
    with Judge(judge_cfg(server, runs=2, concurrency=3)) as judge:
        results = judge.score_many([items[0], tuple(vars(items[1]).values()), items[2]])
    assert [r.scores["if"] for r in results] == [3.0, 6.0, 9.0]
    assert all(len(r.runs) == 2 for r in results)
    assert len(server.requests) == 6 and server.max_in_flight <= 3


def test_json_inside_prose_and_fences_is_read(server):
    fenced = 'Sure!\n```json\n{"IF": 8, "VQ": 9, "CP": 9, "MC": 9}\n```'
    server.reset(lambda body, index: Reply(content=fenced))
    with Judge(judge_cfg(server, runs=1)) as judge:
        result = judge.score(clip(), clip(seed=1), "Add a hat.", "video")
    assert result.scores == {"if": 8.0, "vq": 9.0, "cp": 9.0, "mc": 9.0}
    assert len(server.requests) == 1


def test_an_unparseable_reply_is_reasked_once(server):
    replies = [Reply(content="I think it is quite good, maybe a nine."), scores_reply(IF=7)]
    server.reset(lambda body, index: replies[index])
    with Judge(judge_cfg(server, runs=1)) as judge:
        result = judge.score(clip(), clip(seed=1), "Add a hat.", "video")
    assert result.scores["if"] == 7.0 and result.failed_runs == 0
    first, second = server.requests
    messages = second.body["messages"]
    assert messages[:2] == first.body["messages"]
    assert messages[2] == {"role": "assistant", "content": "I think it is quite good, maybe a nine."}
    assert messages[3]["role"] == "user" and "no JSON object" in messages[3]["content"]


def test_a_reply_unusable_twice_fails_the_run_with_an_excerpt(server):
    server.reset(lambda body, index: Reply(content='{"IF": 12, "VQ": 9, "CP": 9, "MC": 9} ' + "x" * 500))
    with Judge(judge_cfg(server, runs=2, concurrency=1)) as judge:
        result = judge.score(clip(), clip(seed=1), "Add a hat.", "video")
    assert result.scores == {} and result.runs == [] and result.failed_runs == 2
    # One request and one re-ask per run, no more.
    assert len(server.requests) == 4
    assert result.error.startswith("all 2 judge runs failed: unusable reply after a re-ask")
    assert "IF=12 is outside 1-10" in result.error and "(x2)" in result.error
    assert "x" * 150 in result.error and "x" * 250 not in result.error  # an excerpt, not the reply


def test_out_of_range_then_good_counts_only_the_good_run(server):
    server.reset(lambda body, index: scores_reply(IF=0) if index == 0 else scores_reply(IF=9))
    with Judge(judge_cfg(server, runs=1)) as judge:
        result = judge.score(clip(), clip(seed=1), "Add a hat.", "video")
    assert result.runs == [{"if": 9, "vq": 9, "cp": 9, "mc": 8}]
    assert len(server.requests) == 2
    assert "IF=0 is outside 1-10" in server.requests[1].body["messages"][3]["content"]


def test_rate_limit_is_retried_by_the_sdk(server):
    def responder(body, index):
        if index == 0:
            slow_down = {"error": {"message": "slow down"}}
            return Reply(status=429, body=slow_down, headers={"retry-after-ms": "1"})
        return scores_reply()

    server.reset(responder)
    with Judge(judge_cfg(server, runs=1, max_retries=2)) as judge:
        result = judge.score(clip(), clip(seed=1), "Add a hat.", "video")
    assert result.error is None and result.scores["if"] == 9.0
    assert len(server.requests) == 2


def test_server_errors_past_the_retries_fail_with_the_status(server):
    server.reset(
        lambda body, index: Reply(
            status=503, body={"error": {"message": "model is loading"}}, headers={"retry-after-ms": "1"}
        )
    )
    with Judge(judge_cfg(server, runs=1, max_retries=2)) as judge:
        result = judge.score(clip(), clip(seed=1), "Add a hat.", "video")
    assert len(server.requests) == 3  # the first try and max_retries retries
    assert result.failed_runs == 1 and result.scores == {}
    assert "HTTP 503" in result.error and "model is loading" in result.error
    assert server.base_url in result.error


def test_a_slow_server_times_out(server):
    server.reset(lambda body, index: Reply(content="{}", delay_s=2.0))
    started = time.monotonic()
    with Judge(judge_cfg(server, runs=1, timeout_s=0.2)) as judge:
        result = judge.score(clip(), clip(seed=1), "Add a hat.", "video")
    assert time.monotonic() - started < 1.5  # gave up long before the server answered
    assert result.error is not None and "timeout" in result.error and "judge.timeout_s=0.2s" in result.error


def test_auto_response_format_falls_back_once_rejected_and_remembers(server):
    def responder(body, index):
        if "response_format" in body:
            return Reply(status=400, body={"error": {"message": "response_format is not supported"}})
        return scores_reply()

    server.reset(responder)
    with Judge(judge_cfg(server, runs=3, concurrency=1)) as judge:
        assert judge.uses_json_mode
        result = judge.score(clip(), clip(seed=1), "Add a hat.", "video")
        assert not judge.uses_json_mode
        judge.score(clip(), clip(seed=1), "Add a hat.", "video")
    assert result.failed_runs == 0 and len(result.runs) == 3
    # One rejected request, then every request goes without response_format.
    assert ["response_format" in r.body for r in server.requests] == [True] + [False] * 6


def test_json_object_mode_does_not_fall_back_and_none_never_asks(server):
    def responder(body, index):
        if "response_format" in body:
            return Reply(status=400, body={"error": {"message": "response_format is not supported"}})
        return scores_reply()

    server.reset(responder)
    with Judge(judge_cfg(server, runs=1, response_format="json_object")) as judge:
        result = judge.score(clip(), clip(seed=1), "Add a hat.", "video")
    assert "HTTP 400" in result.error and "response_format is not supported" in result.error
    assert len(server.requests) == 1
    server.reset(responder)
    with Judge(judge_cfg(server, runs=2, response_format="none")) as judge:
        result = judge.score(clip(), clip(seed=1), "Add a hat.", "video")
    assert result.error is None and not any("response_format" in r.body for r in server.requests)


def test_a_400_not_caused_by_json_mode_is_not_remembered(server):
    server.reset(lambda body, index: Reply(status=400, body={"error": {"message": "too many images"}}))
    with Judge(judge_cfg(server, runs=1)) as judge:
        result = judge.score(clip(), clip(seed=1), "Add a hat.", "video")
        assert judge.uses_json_mode
    assert "HTTP 400" in result.error and "too many images" in result.error
    assert len(server.requests) == 2


def test_api_key_is_sent_as_bearer_and_never_shown(server):
    server.reset(
        lambda body, index: Reply(
            status=401, body={"error": {"message": f"Incorrect API key provided: {SECRET}."}}
        )
    )
    judge = Judge(judge_cfg(server, runs=1))
    result = judge.score(clip(), clip(seed=1), "Add a hat.", "video")
    judge.close()
    assert server.requests[0].headers["authorization"] == f"Bearer {SECRET}"
    assert "HTTP 401" in result.error and "<redacted>" in result.error
    for shown in (result.error, repr(result), repr(judge), repr(judge.cfg)):
        assert SECRET not in shown


def test_an_explicit_key_wins_and_a_missing_key_sends_a_placeholder(server, monkeypatch):
    server.reset(lambda body, index: scores_reply())
    with Judge(judge_cfg(server, runs=1), api_key="sk-explicit") as judge:
        judge.score(clip(1), clip(1), "Add a hat.", "image")
    monkeypatch.delenv("OPENAI_API_KEY")
    with Judge(judge_cfg(server, runs=1)) as judge:
        judge.score(clip(1), clip(1), "Add a hat.", "image")
    assert [r.headers["authorization"] for r in server.requests] == ["Bearer sk-explicit", "Bearer EMPTY"]


def test_connection_errors_name_the_redacted_endpoint():
    cfg = JudgeConfig(enabled=True, base_url="http://user:hunter2@127.0.0.1:1/v1?token=abc", model="m")
    cfg.max_retries = 0
    with Judge(cfg) as judge:
        result = judge.score(clip(1), clip(1), "Add a hat.", "image")
        assert "hunter2" not in repr(judge)
    assert "cannot connect to http://127.0.0.1:1/v1?<redacted>" in result.error
    assert "hunter2" not in result.error and "token=abc" not in result.error


@pytest.mark.parametrize("rubric", sorted(RUBRICS))
def test_every_rubric_asks_for_the_same_fields(server, rubric):
    server.reset(lambda body, index: scores_reply())
    with Judge(judge_cfg(server, runs=1, rubric=rubric)) as judge:
        result = judge.score(clip(), clip(seed=1), "Add a hat.", "video")
    assert set(result.scores) == {"if", "vq", "cp", "mc"}
    system = server.requests[0].body["messages"][0]["content"]
    assert all(f"- {name}:" in system for name in ("IF", "VQ", "CP", "MC"))
    assert RUBRICS[rubric]["IF"] in system


def test_bad_frames_raise_before_any_request(server):
    server.reset(lambda body, index: scores_reply())
    with Judge(judge_cfg(server, runs=1)) as judge:
        with pytest.raises(ValueError, match="uint8 shaped"):
            judge.score(clip().astype(np.float32), clip(), "Add a hat.", "video")
        with pytest.raises(ValueError, match="media"):
            judge.score(clip(), clip(), "Add a hat.", "audio")
    assert server.requests == []
