"""Remote inference: windows scored by a server speaking OpenAI's chat-completions API.

vLLM, SGLang, llama.cpp's ``llama-server``, Ollama, LM Studio and mlx-vlm's server all take a
window as one request: its frames as JPEG ``image_url`` parts, labelled as SmolVLM2's video
prompt labels them (spec.md "Remote inference", issue 8). A window that needs only its score
(``describe_below`` above it) costs one request of a few tokens; the description is a second
request, continuing the first answer where the server can (``model.continue_final_message``).

The HTTP client is async and lives on a private event loop with a thread of its own
(``streamd-openai``), so no request touches the daemon's loop. The ``ModelRunner`` keeps
``max_in_flight`` calls of one window each open at once, from its model threads: each
``score`` hands its request to that loop and waits for the answer, and a slow request holds
up no other.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import httpx
from pydantic import JsonValue

from streamd.domain import Frame, Score, ScoreRequest, StageTimings
from streamd.errors import ModelError
from streamd.log import redact_url
from streamd.scoring.base import NothingAhead
from streamd.scoring.openai_config import API_KEY_ENV, OpenAIModelConfig, resolve_api_key
from streamd.scoring.openai_request import (
    PREFIXED_SCORE_MAX_TOKENS,
    SCORE_MAX_TOKENS,
    SCORE_PREFIX,
    Body,
    Completion,
    chat_body,
    description_prefix,
    encode_jpeg,
    error_message,
    expected_prompt_tokens,
    looks_tiled,
    prompt_chars,
    read_completion,
    retry_after_s,
    served_model_ids,
    user_content,
)
from streamd.scoring.prompt import clean_description
from streamd.scoring.smolvlm.checkpoint import (
    DEFAULT_MIN_DIGIT_MASS,
    best_frame_index,
    first_line,
    loaded,
    warm_up_request,
)

logger = logging.getLogger(__name__)

INPUT_SIZE = (512, 512)
"""One 512-px tile a frame, as SmolVLM2's video path: bigger frames get tiled (13+ at 1080p)."""
JPEG_CACHE_FRAMES = 512
"""Frames whose JPEG is kept (~50 KB each): overlapping windows of many streams reuse them."""
CONNECT_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 5.0
RETRY_WAIT_CAP_S = 10.0
"""Longest wait between retries of a busy server (429/503), whatever ``Retry-After`` says."""
BUSY = frozenset({429, 503})
REFUSED = frozenset({401, 403})
REJECTED = frozenset({400, 413, 422})
NOT_FOUND = 404


class JpegCache:
    """Data URIs of recent frames by ``(stream, index)``, least recently used dropped first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self._uris: OrderedDict[tuple[str, int], str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._uris)

    def uri(self, frame: Frame) -> tuple[str, bool]:
        """``frame`` as a JPEG data URI, and whether it was cached."""
        key = (frame.stream, frame.index)
        found = self._uris.get(key)
        if found is not None:
            self._uris.move_to_end(key)
            self.hits += 1
            return found, True
        uri = encode_jpeg(frame.image)
        self._uris[key] = uri
        if len(self._uris) > self.capacity:
            self._uris.popitem(last=False)
        self.misses += 1
        return uri, False


@dataclass(frozen=True, slots=True)
class _Prepared:
    """One window's request content, ready to send."""

    request: ScoreRequest
    content: list[JsonValue]
    text_chars: int
    hits: int
    misses: int


@dataclass(frozen=True, slots=True)
class _Answer:
    """A window's answer: one completion, or the score's and then the description's.

    Attributes:
        first: The only completion, or the one that asked for the score.
        second: The description's completion, if one was asked for.
        description: The description, when ``first``'s own is not it.
        continued: The assistant message ``second`` continued ("" for a whole answer).
    """

    first: Completion
    second: Completion | None = None
    description: str | None = None
    continued: str = ""

    def tokens(self, kind: Literal["prompt_tokens", "completion_tokens"]) -> int:
        """Tokens of ``kind`` over both requests, as the server counted them."""
        return sum(getattr(c, kind) or 0 for c in (self.first, self.second) if c is not None)


class OpenAIBackend(NothingAhead):
    """Scores windows on an OpenAI-compatible server (``model.backend: openai``).

    Args:
        config: The ``model:`` section.
        environ: Where ``$OPENAI_API_KEY`` is read at ``load`` (default ``os.environ``).
        min_digit_mass: Below this probability of "1".."9" at the answer's number, the score
            is parsed from the text instead of read from the digit probabilities.
    """

    name = "openai"

    def __init__(
        self,
        config: OpenAIModelConfig,
        *,
        environ: Mapping[str, str] | None = None,
        min_digit_mass: float = DEFAULT_MIN_DIGIT_MASS,
    ) -> None:
        self.config = config
        self._min_digit_mass = min_digit_mass
        self.model_id = config.id
        self.jpegs = JpegCache(JPEG_CACHE_FRAMES)
        self._environ = os.environ if environ is None else environ
        self._url = redact_url(config.base_url)
        self._secret = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: httpx.AsyncClient | None = None
        self._warned_tiling = False

    @property
    def input_size(self) -> tuple[int, int]:
        """``(width, height)``: one 512 tile a frame."""
        return INPUT_SIZE

    @property
    def max_batch(self) -> int:
        """One window a call: the server batches the requests in flight itself."""
        return 1

    @property
    def max_in_flight(self) -> int:
        """Requests open at once: ``model.max_in_flight``."""
        return self.config.max_in_flight

    # --- lifecycle ----------------------------------------------------------------------------

    def load(self) -> None:
        """Connect and check that the server serves ``model.id``.

        Raises:
            ModelError: The server is unreachable, refuses the key, or does not serve the model.
        """
        self.close()
        key = resolve_api_key(self.config, self._environ)
        self._secret = key.get_secret_value() if key is not None else ""
        headers = {"Authorization": f"Bearer {self._secret}"} if self._secret else {}
        timeout_s = self.config.timeout_s
        self._loop = loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name="streamd-openai", daemon=True)
        self._thread.start()
        self._client = httpx.AsyncClient(
            base_url=self.config.base_url + "/",
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=min(CONNECT_TIMEOUT_S, timeout_s)),
            limits=httpx.Limits(
                max_connections=self.config.max_in_flight,
                max_keepalive_connections=self.config.max_in_flight,
            ),
        )
        try:
            served = self._run(self._served_models())
            if self.config.id not in served:
                offered = ", ".join(repr(i) for i in served) or "none"
                raise ModelError(
                    f"the server at {self._url} does not serve {self.config.id!r}; it serves:"
                    f" {offered}: set model.id to one of them"
                )
        except BaseException:
            self.close()
            raise
        logger.info("model server %s serves %s", self._url, self.config.id)

    def warm_up(self) -> None:
        """Score one 2-frame window: the connection is open before the first real one."""
        self.score([warm_up_request(*INPUT_SIZE)])

    def describe(self) -> str:
        """``openai <id> at <base_url> (max_in_flight N)``, credentials redacted."""
        return f"openai {self.config.id} at {self._url} (max_in_flight {self.config.max_in_flight})"

    def close(self) -> None:
        """Close the connections and the private event loop (idempotent)."""
        loop, client, thread = self._loop, self._client, self._thread
        self._loop, self._client, self._thread = None, None, None
        if loop is None:
            return
        try:
            if client is not None:
                asyncio.run_coroutine_threadsafe(client.aclose(), loop).result(CLOSE_TIMEOUT_S)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            if thread is not None:
                thread.join(CLOSE_TIMEOUT_S)
            if not loop.is_running():
                loop.close()

    # --- scoring ------------------------------------------------------------------------------

    def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        """Send every window at once; one ``Score`` per request, in order.

        Raises:
            ModelError: A request failed (unreachable, timed out, rejected): the runner fails
                this call's windows and the next call tries again.
        """
        loop = loaded(self._loop, self.model_id)
        return asyncio.run_coroutine_threadsafe(self._score_all(requests), loop).result()

    async def _score_all(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        started = time.perf_counter()
        prepared = [self._prepare(request) for request in requests]
        encoded = time.perf_counter()
        answers = await asyncio.gather(
            *(self._answer(item) for item in prepared), return_exceptions=True
        )
        done: list[_Answer] = []
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer
            done.append(answer)
        timings = (encoded - started, time.perf_counter() - encoded)
        return [
            self._read(item, answer, timings) for item, answer in zip(prepared, done, strict=True)
        ]

    def _prepare(self, request: ScoreRequest) -> _Prepared:
        window = request.window
        uris, hits = [], 0
        for frame in window.frames:
            uri, cached = self.jpegs.uri(frame)
            uris.append(uri)
            hits += cached
        offsets = [frame.pts_s - window.start_s for frame in window.frames]
        content = user_content(request.prompt, offsets, window.duration_s, uris)
        chars = prompt_chars(request.prompt, content)
        return _Prepared(request, content, chars, hits, len(uris) - hits)

    def _body(self, item: _Prepared, max_tokens: int, prefix: str | None = None) -> Body:
        return chat_body(
            self.config.id,
            item.request.prompt,
            item.content,
            max_tokens,
            self.config.extra_body,
            assistant_prefix=prefix,
        )

    async def _answer(self, item: _Prepared) -> _Answer:
        """One request, or two when only windows at or above ``describe_below`` are described.

        The first asks for the score alone (a few tokens); a window at or above the threshold,
        or one whose score could not be read, then gets its description: continuing the first
        answer where the server can (``model.continue_final_message``, cheap with vLLM's
        prefix cache), else as a whole answer.
        """
        full = self.config.max_new_tokens
        describe_below = item.request.describe_threshold()
        if describe_below is None:
            return _Answer(await self._completion(item, self._body(item, full)))
        prefix = SCORE_PREFIX if self.config.continue_final_message else None
        limit = SCORE_MAX_TOKENS if prefix is None else PREFIXED_SCORE_MAX_TOKENS
        first = await self._completion(item, self._body(item, limit, prefix), prefix is not None)
        significance = first.significance
        if significance is not None and significance < describe_below:
            raw = first.text if prefix is None else prefix + first.text
            return _Answer(replace(first, text=raw, description=""))
        if prefix is None or significance is None:
            second = await self._completion(item, self._body(item, full))
            return _Answer(first, second, second.description)
        continued = description_prefix(significance)
        second = await self._completion(item, self._body(item, full, continued))
        return _Answer(first, second, clean_description(second.text), continued)

    async def _completion(
        self, item: _Prepared, body: Body, after_prefix: bool = False
    ) -> Completion:
        answer = await self._post_window(item, body)
        return read_completion(answer, self._min_digit_mass, after_prefix)

    def _read(self, item: _Prepared, answer: _Answer, timings: tuple[float, float]) -> Score:
        first, second = answer.first, answer.second
        frames = item.request.window.frames
        self._check_tokens(first.prompt_tokens, len(frames), item.text_chars)
        significance = first.significance
        if significance is None and second is not None:
            significance = second.significance
        raw = first.text
        if second is not None:
            raw = answer.continued + second.text if answer.continued else second.text
        return Score(
            significance=significance,
            description=first.description if answer.description is None else answer.description,
            raw=raw,
            timings=StageTimings(
                vision_s=timings[0],
                generate_s=timings[1],
                vision_hits=item.hits,
                vision_misses=item.misses,
                prompt_tokens=answer.tokens("prompt_tokens"),
                completion_tokens=answer.tokens("completion_tokens"),
            ),
            best_frame=best_frame_index(frames),
        )

    def _check_tokens(self, prompt_tokens: int | None, frames: int, text_chars: int) -> None:
        if self._warned_tiling or not looks_tiled(prompt_tokens, frames, text_chars):
            return
        self._warned_tiling = True
        logger.warning(
            "the server counted %s prompt tokens for a window of %d frames, over %d expected"
            " with one 512-px tile a frame: it is likely tiling frames (8-17x the cost); make"
            " its image processor keep one tile per image (vLLM: --mm-processor-kwargs"
            ' \'{"size": {"longest_edge": 512}}\'; README "Scale out" for other servers)',
            prompt_tokens,
            frames,
            expected_prompt_tokens(frames, text_chars),
        )

    # --- HTTP ---------------------------------------------------------------------------------

    def _run(self, coroutine: Coroutine[object, object, list[str]]) -> list[str]:
        loop = loaded(self._loop, self.model_id)
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result()

    async def _served_models(self) -> list[str]:
        response = await self._send("GET", "models", None)
        if response.status_code == NOT_FOUND:
            raise ModelError(
                f"{self._url}/models is not found (404): set model.base_url to the server's"
                " API root (usually ending in /v1)"
            )
        self._check(response, "at startup")
        return served_model_ids(self._json(response))

    async def _post_window(self, item: _Prepared, body: Body) -> object:
        frames = len(item.request.window.frames)
        status = 0
        try:
            async with asyncio.timeout(self.config.timeout_s):  # retries included
                attempt = 0
                response = await self._send("POST", "chat/completions", body)
                while (status := response.status_code) in BUSY:
                    wait_s = retry_after_s(
                        response.headers.get("retry-after"), attempt, RETRY_WAIT_CAP_S
                    )
                    logger.debug("model server busy (%d): retrying in %.1fs", status, wait_s)
                    await asyncio.sleep(wait_s)
                    attempt += 1
                    response = await self._send("POST", "chat/completions", body)
        except TimeoutError:
            busy = f" (busy: {status})" if status in BUSY else ""
            raise ModelError(
                f"model server {self._url} gave no answer within {self.config.timeout_s:g}s"
                f"{busy}: raise model.timeout_s or lower the load",
                reason="busy" if busy else "timeout",
            ) from None
        if response.status_code in REJECTED:
            message = self._scrub(error_message(self._json_or_none(response), response.text))
            raise ModelError(
                f"the model server rejected a window of {frames} frames"
                f" ({response.status_code}: {message}): lower window_s or sample_fps so a"
                " window holds fewer frames, or raise the server's image and context limits",
                reason="rejected",
            )
        self._check(response, "on a window")
        return self._json(response)

    async def _send(self, method: str, path: str, body: Body | None) -> httpx.Response:
        client = loaded(self._client, self.model_id)
        try:
            return await client.request(method, path, json=body)
        except httpx.TimeoutException as exc:
            if isinstance(exc, httpx.ConnectTimeout):
                raise self._unreachable(exc) from None
            raise ModelError(
                f"model server {self._url} gave no answer within {self.config.timeout_s:g}s:"
                " raise model.timeout_s or lower the load",
                reason="timeout",
            ) from None
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None

    def _unreachable(self, exc: Exception) -> ModelError:
        return ModelError(
            f"model server unreachable: {self._url} ({self._scrub(first_line(exc))})",
            reason="unreachable",
            health="model server unreachable",
        )

    def _check(self, response: httpx.Response, during: str) -> None:
        status = response.status_code
        if status in REFUSED:
            raise ModelError(
                f"the server at {self._url} refused the API key ({status}) {during}: set"
                f" model.api_key_file (or ${API_KEY_ENV}) to a key it accepts",
                reason="refused",
                health="model server refused the API key",
            )
        if not response.is_success:
            message = self._scrub(error_message(self._json_or_none(response), response.text))
            raise ModelError(f"model server {self._url} answered {status} {during}: {message}")

    def _json(self, response: httpx.Response) -> object:
        body = self._json_or_none(response)
        if body is None:
            raise ModelError(f"model server {self._url} sent no JSON (HTTP {response.status_code})")
        return body

    @staticmethod
    def _json_or_none(response: httpx.Response) -> object:
        try:
            body: object = response.json()
        except ValueError:
            return None
        return body

    def _scrub(self, text: str) -> str:
        """``text`` without the key, should a server or a library ever echo it."""
        return text.replace(self._secret, "***") if self._secret else text
