"""A VLM judge: scores an edit (source, edited result, instruction) through an OpenAI-compatible
chat endpoint — a local vLLM serving Qwen2.5-VL, GPT-4o, or Gemini's OpenAI-compatible API.

SAMA.md: a VLM judge scores each pair 1-10 on Instruction Following (IF), Visual Quality (VQ),
Content Preservation (CP) and, for video, Motion Consistency (MC); the score is the mean of 3 runs.
:class:`Judge` sends ``JudgeConfig.frames`` evenly sampled frames of the source and of the edit as
image data URLs (so a video costs ``2 * frames`` images per request: a vLLM server needs
``--limit-mm-per-prompt`` allowing that many), asks for one JSON object with integer fields
``IF``, ``VQ``, ``CP`` (and ``MC`` for video), repeats that ``runs`` times and averages the runs
that returned usable scores.

Failures never raise out of :meth:`Judge.score`: a timeout, an HTTP error or an unusable reply
fails that run (recorded with its reason); the result carries an ``error`` only when no run
succeeded. Retries: the ``openai`` SDK retries 408/409/429/5xx, connection errors and timeouts up
to ``max_retries`` times with backoff (honouring ``Retry-After``); an unparseable reply is re-asked
once per run.

The API key is read from ``OPENAI_API_KEY`` (a placeholder is sent when it is unset, which a local
vLLM started without ``--api-key`` accepts); it is never stored in the config, a result or a
message. Messages name the endpoint through :func:`sama.storage.redact`.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from sama import storage

log = logging.getLogger(__name__)

API_KEY_ENV = "OPENAI_API_KEY"
# Sent when OPENAI_API_KEY is unset: the SDK insists on some key, a keyless vLLM ignores it.
PLACEHOLDER_API_KEY = "EMPTY"
MEDIA = ("video", "image")
RESPONSE_FORMATS = ("auto", "json_object", "none")
IMAGE_FORMATS = {"png": "PNG", "jpeg": "JPEG"}
MIN_SCORE, MAX_SCORE = 1, 10
# Characters of a reply or an error body quoted in a failure message.
EXCERPT_CHARS = 200

# --------------------------------------------------------------------------------------------
# Rubrics. Every rubric asks for the same fields (IF, VQ, CP, MC) so scores stay comparable
# across rubrics and with SAMA.md's filter thresholds; what differs is how each field is framed.

_SCALE = (
    "Score each criterion with an integer from 1 (fails completely) to 10 (flawless); use the whole "
    "scale and be strict: reserve 9 and 10 for edits you could not tell apart from a careful human edit."
)

_SAMA_CRITERIA = {
    "IF": "Instruction Following: does the edited result carry out exactly what the instruction asks "
    "(the right object, attribute, region and amount), without doing something else instead?",
    "VQ": "Visual Quality: is the edited result sharp, natural and free of artifacts (blur, smears, "
    "distorted shapes, broken textures, flicker, seams around the edited region)?",
    "CP": "Content Preservation: is everything the instruction does not ask to change kept identical to "
    "the source (identity, layout, background, colours, framing)?",
    "MC": "Motion Consistency: does the edited video keep the source's motion (camera and object "
    "movement, timing) and stay temporally coherent from frame to frame?",
}

# VIE-Bench scores edits with a GPT-4o judge (SAMA.md); its exact prompt is not reproduced here
# (we could not establish it), so this is our own wording of the aspects such benchmarks grade,
# mapped onto IF/VQ/CP/MC.
_VIE_BENCH_CRITERIA = {
    "IF": "Instruction adherence: how completely and precisely the requested edit (add, swap, remove or "
    "restyle) was performed.",
    "VQ": "Rendering quality: realism and cleanliness of the edited result, including the newly "
    "generated content.",
    "CP": "Fidelity to the source: parts of the scene the instruction leaves alone are unchanged.",
    "MC": "Temporal quality: the edit follows the source's motion and stays stable across frames.",
}

# OpenVE-Bench grades instruction compliance, consistency/detail fidelity and visual quality with
# a VLM judge; its exact prompt and scale are not reproduced here (not established), so this is
# our wording of those aspects on the IF/VQ/CP(/MC) fields.
_OPENVE_BENCH_CRITERIA = {
    "IF": "Instruction compliance: the edit requested by the instruction is present and correct.",
    "VQ": "Visual quality and stability: the result looks natural, detailed and artifact-free.",
    "CP": "Consistency and detail fidelity: unedited content and fine details of the source survive.",
    "MC": "Motion fidelity: the edited video moves like the source and does not flicker.",
}

# ReCo-Bench reports an overall score S from a VLM judge over edit accuracy, naturalness and
# quality; its exact prompt is not reproduced here (not established), so this is our wording of
# those aspects on the IF/VQ/CP(/MC) fields.
_RECO_BENCH_CRITERIA = {
    "IF": "Edit accuracy: the edit lands on the intended region or object and matches the instruction.",
    "VQ": "Naturalness and quality: the edited region blends with its surroundings and looks real.",
    "CP": "Preservation: regions outside the edit are untouched.",
    "MC": "Temporal naturalness: the edited content moves plausibly with the scene across frames.",
}

RUBRICS: dict[str, dict[str, str]] = {
    "sama": _SAMA_CRITERIA,
    "vie_bench": _VIE_BENCH_CRITERIA,
    "openve_bench": _OPENVE_BENCH_CRITERIA,
    "reco_bench": _RECO_BENCH_CRITERIA,
}


@dataclass
class JudgeConfig:
    """The VLM judge: which endpoint and model, how many runs, what it is shown and how it is asked."""

    enabled: bool = False
    # An OpenAI-compatible API root, e.g. http://localhost:8000/v1 (vLLM) or
    # https://api.openai.com/v1. The key comes from OPENAI_API_KEY, never from the config.
    base_url: str | None = None
    model: str | None = None
    # Requests per sample whose scores are averaged (SAMA.md: the mean of 3 runs).
    runs: int = 3
    # One of RUBRICS: "sama" (IF/VQ/CP/MC as SAMA.md), "vie_bench", "openve_bench", "reco_bench".
    rubric: str = "sama"
    # Frames evenly sampled from the source and from the edit (an image is one frame).
    frames: int = 4
    # Longest side of every image sent (larger frames are downscaled; smaller ones are sent as is).
    image_side: int = 512
    # "png" (lossless: no compression artifacts for the judge to grade as poor quality) or "jpeg".
    image_format: str = "png"
    jpeg_quality: int = 90
    # Runs are averaged, so they must be able to differ: greedy decoding (0) would repeat one
    # answer `runs` times. 0.7 samples moderately, as a judge's scores vary between readings.
    temperature: float = 0.7
    # The reply is a short JSON object; the room covers a model that adds a sentence around it.
    max_tokens: int = 512
    # Sent as the request's `seed` (plus the run index) when set, for servers that honour it.
    seed: int | None = None
    # Seconds per HTTP request; the SDK retries timeouts, 429 and 5xx up to max_retries times.
    timeout_s: float = 60.0
    max_retries: int = 4
    # Requests in flight at once per Judge (across score / score_many calls).
    concurrency: int = 4
    # "json_object" asks the server for JSON mode, "none" never does, "auto" asks and, once the
    # server rejects it with HTTP 400, stops asking for the rest of the Judge's life.
    response_format: str = "auto"

    def validate(self) -> None:
        if self.enabled:
            if not self.base_url:
                raise ValueError("judge.base_url is required when the judge is enabled")
            if not self.model:
                raise ValueError("judge.model is required when the judge is enabled")
        if self.runs < 1:
            raise ValueError(f"judge.runs must be >= 1, got {self.runs}")
        if self.rubric not in RUBRICS:
            raise ValueError(f"judge.rubric {self.rubric!r} is unknown (known: {', '.join(RUBRICS)})")
        if self.frames < 1:
            raise ValueError(f"judge.frames must be >= 1, got {self.frames}")
        if self.image_side < 16:
            raise ValueError(f"judge.image_side must be >= 16, got {self.image_side}")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"judge.image_format must be one of {', '.join(IMAGE_FORMATS)}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError("judge.jpeg_quality must be in [1, 100]")
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"judge.temperature must be in [0, 2], got {self.temperature}")
        if self.max_tokens < 1:
            raise ValueError("judge.max_tokens must be >= 1")
        if not self.timeout_s > 0:
            raise ValueError("judge.timeout_s must be positive")
        if self.max_retries < 0:
            raise ValueError("judge.max_retries must be >= 0")
        if self.concurrency < 1:
            raise ValueError("judge.concurrency must be >= 1")
        if self.response_format not in RESPONSE_FORMATS:
            raise ValueError(f"judge.response_format must be one of {', '.join(RESPONSE_FORMATS)}")


@dataclass
class JudgeResult:
    """One sample's judgement.

    ``scores``: lower-case criterion -> mean over the successful runs (``{}`` when none succeeded);
    ``runs``: each successful run's integer scores; ``failed_runs``: runs that produced no scores;
    ``error``: why, when no run succeeded (otherwise None).
    """

    scores: dict[str, float] = field(default_factory=dict)
    runs: list[dict[str, int]] = field(default_factory=list)
    error: str | None = None
    failed_runs: int = 0


@dataclass
class JudgeItem:
    """What :meth:`Judge.score_many` takes per sample (the arguments of :meth:`Judge.score`)."""

    source_frames: np.ndarray
    edited_frames: np.ndarray
    instruction: str
    media: str


class ReplyError(ValueError):
    """A judge reply without usable scores; the message says why."""


def criteria_for(media: str) -> tuple[str, ...]:
    """Upper-case criteria asked for ``media``: MC only for video."""
    return ("IF", "VQ", "CP", "MC") if media == "video" else ("IF", "VQ", "CP")


def parse_reply(text: str | None, media: str) -> dict[str, int]:
    """The scores in a judge reply: the FIRST JSON object in ``text`` (prose or ``` fences around it
    are ignored), with integer fields IF, VQ, CP (and MC for video) in 1-10; keys are matched
    case-insensitively and returned lower-case. Raises :class:`ReplyError` naming the problem."""
    if text is None or not text.strip():
        raise ReplyError("empty reply")
    found = _first_json_object(text)
    if found is None:
        raise ReplyError("no JSON object in the reply")
    by_name = {str(key).strip().upper(): value for key, value in found.items()}
    scores = {}
    for name in criteria_for(media):
        if name not in by_name:
            raise ReplyError(f"the JSON object has no {name} field")
        scores[name.lower()] = _score_value(name, by_name[name])
    return scores


def _first_json_object(text: str) -> dict | None:
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, dict):
            return value
        start = text.find("{", start + 1)
    return None


def _score_value(name: str, value) -> int:
    # bool is an int in Python, but `true` is no score.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ReplyError(f"{name} is {value!r}, not an integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise ReplyError(f"{name} is {value!r}, not an integer")
        value = int(value)
    if not MIN_SCORE <= value <= MAX_SCORE:
        raise ReplyError(f"{name}={value} is outside {MIN_SCORE}-{MAX_SCORE}")
    return value


def sample_frames(frames: np.ndarray, count: int) -> np.ndarray:
    """``count`` frames evenly spread over ``frames`` (first and last included); all when fewer."""
    total = len(frames)
    if total <= count:
        return frames
    indices = np.unique(np.linspace(0, total - 1, count).round().astype(int))
    return frames[indices]


def _as_frames(frames: np.ndarray, role: str) -> np.ndarray:
    array = np.asarray(frames)
    if array.ndim == 3:
        array = array[None]
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3 or len(array) == 0:
        raise ValueError(
            f"{role} frames must be uint8 shaped (T, H, W, 3), got {array.dtype} {tuple(array.shape)}"
        )
    return array


def _excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


class Judge:
    """Scores edits with the VLM behind ``cfg.base_url``; see the module docstring.

    Thread-safe: at most ``cfg.concurrency`` requests are in flight at once for this Judge, however
    many threads call :meth:`score` / :meth:`score_many`. Close it (or use it as a context manager)
    to release its HTTP connections.
    """

    def __init__(self, cfg: JudgeConfig, api_key: str | None = None):
        cfg.validate()
        if not cfg.base_url or not cfg.model:
            raise ValueError("a Judge needs judge.base_url and judge.model")
        # Imported here: the prep job imports JudgeConfig without needing the SDK installed.
        import openai

        self.cfg = cfg
        self._openai = openai
        self._endpoint = storage.redact(cfg.base_url)
        self._api_key = api_key or os.environ.get(API_KEY_ENV) or PLACEHOLDER_API_KEY
        self._client = openai.OpenAI(
            base_url=cfg.base_url,
            api_key=self._api_key,
            timeout=cfg.timeout_s,
            max_retries=cfg.max_retries,
        )
        self._slots = threading.BoundedSemaphore(cfg.concurrency)
        self._lock = threading.Lock()
        self._json_mode = cfg.response_format in ("auto", "json_object")
        self._system_prompt = _system_prompt(RUBRICS[cfg.rubric])

    def __repr__(self) -> str:
        return (
            f"Judge(model={self.cfg.model!r}, base_url={self._endpoint!r}, rubric={self.cfg.rubric!r}, "
            f"runs={self.cfg.runs})"
        )

    def __enter__(self) -> Judge:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    @property
    def uses_json_mode(self) -> bool:
        """Whether requests still ask for ``response_format={"type": "json_object"}``."""
        return self._json_mode

    def score(
        self, source_frames: np.ndarray, edited_frames: np.ndarray, instruction: str, media: str
    ) -> JudgeResult:
        """Judge one edit: ``cfg.runs`` requests (concurrently), their successful scores averaged.

        Frames are uint8 ``(T, H, W, 3)`` arrays (an image is ``T=1``); ``media`` is "video" or
        "image". Raises ValueError only for bad arguments, never for a server or reply failure.
        """
        return self.score_many([JudgeItem(source_frames, edited_frames, instruction, media)])[0]

    def score_many(self, items: Iterable[JudgeItem | Sequence]) -> list[JudgeResult]:
        """:meth:`score` for every item (a :class:`JudgeItem` or a ``(source_frames, edited_frames,
        instruction, media)`` tuple), in order, with at most ``cfg.concurrency`` requests in flight.

        Every item's images are encoded before the first request, so pass a batch at a time, not a
        whole benchmark."""
        items = [item if isinstance(item, JudgeItem) else JudgeItem(*item) for item in items]
        prepared = [self._messages(item) for item in items]
        tasks = [(index, run) for index in range(len(prepared)) for run in range(self.cfg.runs)]
        if not tasks:
            return []
        with ThreadPoolExecutor(max_workers=min(self.cfg.concurrency, len(tasks))) as pool:
            futures = [pool.submit(self._run, prepared[index], run) for index, run in tasks]
            outcomes = [future.result() for future in futures]
        results = []
        for index in range(len(prepared)):
            mine = outcomes[index * self.cfg.runs : (index + 1) * self.cfg.runs]
            results.append(self._combine(mine))
        return results

    # ----------------------------------------------------------------------------------------

    def _messages(self, item: JudgeItem) -> tuple[list[dict], str]:
        if item.media not in MEDIA:
            raise ValueError(f"media must be 'video' or 'image', got {item.media!r}")
        source = sample_frames(_as_frames(item.source_frames, "source"), self.cfg.frames)
        edited = sample_frames(_as_frames(item.edited_frames, "edited"), self.cfg.frames)
        names = criteria_for(item.media)
        if item.media == "video":
            parts = [
                f"SOURCE video: {len(source)} frames sampled evenly in time order.",
                *self._images(source),
                f"EDITED video: {len(edited)} frames sampled evenly in time order.",
                *self._images(edited),
            ]
        else:
            parts = ["SOURCE image:", *self._images(source), "EDITED image:", *self._images(edited)]
        answer = ", ".join(f'"{name}": <1-10>' for name in names)
        parts.append(
            f"Editing instruction: {item.instruction.strip()}\n\n"
            f"Score the EDITED {item.media} against the SOURCE and the instruction on {', '.join(names)}. "
            f"Reply with only a JSON object of integers: {{{answer}}}"
        )
        content = [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]
        messages = [
            {"role": "system", "content": self._system_prompt},
            {"role": "user", "content": content},
        ]
        return messages, item.media

    def _images(self, frames: np.ndarray) -> list[dict]:
        return [{"type": "image_url", "image_url": {"url": self._data_url(frame)}} for frame in frames]

    def _data_url(self, frame: np.ndarray) -> str:
        image = Image.fromarray(np.ascontiguousarray(frame))
        longest = max(image.size)
        if longest > self.cfg.image_side:
            scale = self.cfg.image_side / longest
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
        buffer = io.BytesIO()
        pil_format = IMAGE_FORMATS[self.cfg.image_format]
        options = {"quality": self.cfg.jpeg_quality} if pil_format == "JPEG" else {}
        image.save(buffer, format=pil_format, **options)
        encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
        return f"data:image/{self.cfg.image_format};base64,{encoded}"

    def _run(self, prepared: tuple[list[dict], str], run: int) -> dict[str, int] | str:
        """One run: its scores, or the reason it failed (one re-ask after an unusable reply)."""
        messages, media = prepared
        try:
            scores, reply, problem = self._reply_scores(messages, run, media)
            if scores is not None:
                return scores
            retry = [
                *messages,
                {"role": "assistant", "content": reply or ""},
                {
                    "role": "user",
                    "content": f"That reply could not be used ({problem}). Reply again with only the JSON "
                    f"object of integer scores {', '.join(criteria_for(media))} from 1 to 10.",
                },
            ]
            scores, reply, problem = self._reply_scores(retry, run, media)
            if scores is not None:
                return scores
            return self._scrub(f"unusable reply after a re-ask ({problem}): {_excerpt(reply or '')!r}")
        except self._openai.OpenAIError as exc:
            return self._describe(exc)

    def _reply_scores(
        self, messages: list[dict], run: int, media: str
    ) -> tuple[dict[str, int] | None, str | None, str | None]:
        """(scores or None, the reply's text, why it is unusable or None) for one request."""
        text, finish_reason = self._ask(messages, run)
        try:
            return parse_reply(text, media), text, None
        except ReplyError as exc:
            problem = str(exc)
            if finish_reason == "length":
                problem += f"; the reply was cut at judge.max_tokens={self.cfg.max_tokens}"
            return None, text, problem

    def _ask(self, messages: list[dict], run: int) -> tuple[str | None, str | None]:
        """The text and finish reason of one chat completion (the SDK retries transient failures)."""
        options: dict = {
            "model": self.cfg.model,
            "messages": messages,
            "temperature": self.cfg.temperature,
            "max_tokens": self.cfg.max_tokens,
        }
        if self.cfg.seed is not None:
            options["seed"] = self.cfg.seed + run
        with self._slots:
            json_mode = self._json_mode
            try:
                completion = self._create(options, json_mode)
            except self._openai.BadRequestError:
                if not (json_mode and self.cfg.response_format == "auto"):
                    raise
                # The server may not support JSON mode (Gemini, older vLLM): try once without it;
                # only when that gets past the 400 was JSON mode the cause, and is dropped for good.
                completion = self._create(options, False)
                with self._lock:
                    if self._json_mode:
                        self._json_mode = False
                        log.warning(
                            "judge %s rejected response_format=json_object (HTTP 400); "
                            "asking without it from now on",
                            self._endpoint,
                        )
        # Read defensively: a loosely compatible server may omit fields the SDK does not enforce.
        choices = getattr(completion, "choices", None) or []
        if not choices:
            return None, None
        message = getattr(choices[0], "message", None)
        content = getattr(message, "content", None)
        return (content if isinstance(content, str) else None), getattr(choices[0], "finish_reason", None)

    def _create(self, options: dict, json_mode: bool):
        extra = {"response_format": {"type": "json_object"}} if json_mode else {}
        return self._client.chat.completions.create(**options, **extra)

    def _describe(self, exc: Exception) -> str:
        """A failure message naming what happened, with the endpoint redacted and no API key."""
        openai = self._openai
        retries = f"after {self.cfg.max_retries} retries"
        if isinstance(exc, openai.APITimeoutError):
            text = (
                f"timeout: no reply within judge.timeout_s={self.cfg.timeout_s:g}s ({retries}) "
                f"from {self._endpoint}"
            )
        elif isinstance(exc, openai.APIStatusError):
            text = f"HTTP {exc.status_code} from {self._endpoint} ({retries}): {_excerpt(exc.message)}"
        elif isinstance(exc, openai.APIConnectionError):
            cause = exc.__cause__ or exc
            text = f"cannot connect to {self._endpoint} ({retries}): {_excerpt(str(cause))}"
        else:
            text = f"{type(exc).__name__} from {self._endpoint}: {_excerpt(str(exc))}"
        return self._scrub(text)

    def _scrub(self, text: str) -> str:
        # A server may echo the key (or the raw URL, which can carry a token) in an error body.
        if self._api_key and self._api_key != PLACEHOLDER_API_KEY:
            text = text.replace(self._api_key, "<redacted>")
        if self.cfg.base_url and self.cfg.base_url != self._endpoint:
            text = text.replace(self.cfg.base_url, self._endpoint)
        return text

    def _combine(self, outcomes: list[dict[str, int] | str]) -> JudgeResult:
        runs = [o for o in outcomes if isinstance(o, dict)]
        failures = [o for o in outcomes if isinstance(o, str)]
        for failure in failures:
            log.info("judge run failed: %s", failure)
        if not runs:
            counted = Counter(failures)
            reasons = "; ".join(f"{reason} (x{n})" if n > 1 else reason for reason, n in counted.items())
            error = f"all {len(outcomes)} judge runs failed: {reasons}"
            return JudgeResult(error=error, failed_runs=len(failures))
        scores = {name: float(np.mean([run[name] for run in runs])) for name in runs[0]}
        return JudgeResult(scores=scores, runs=runs, failed_runs=len(failures))


def _system_prompt(criteria: dict[str, str]) -> str:
    lines = [
        "You are a strict evaluator of instruction-guided image and video edits. You see frames of a "
        "SOURCE, frames of its EDITED version, and the editing instruction that was given.",
        _SCALE,
        "Criteria:",
        *(f"- {name}: {text}" for name, text in criteria.items()),
        "MC applies to videos only; do not score it for an image.",
        "Answer with a single JSON object of integer scores and nothing else.",
    ]
    return "\n".join(lines)
