"""The AI assistant: streamed chat completions from any OpenAI-compatible server.

`stream_reply` calls the model with streaming, hands every text delta to a callback, stops
the upstream call when asked to cancel (closing the HTTP response, not just the display),
retries timeouts, 429s (after their Retry-After) and 5xx while no text has been sent and the
first-token timeout allows, and reports a failure so the caller can send a clearly labelled
fallback. Once text flows, a stream is ended only by silence longer than the idle timeout or
by the overall cap, and what came is kept, marked as cut.

The request goes out through the client's own `post` (its documented way to send a body as
is) rather than `chat.completions.create`, which first walks every message of the history
through its typed-dict transform: 0.4 ms a message, 21 ms for a 50-message history, all of
it on the path to the first delta, for plain strings that need no transforming.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import openai
from flask import current_app
from openai.types.chat import ChatCompletion, ChatCompletionChunk

log = logging.getLogger(__name__)

NOT_CONFIGURED_REPLY = (
    "This assistant is not connected to a language model yet (no OPENAI_API_KEY or "
    "OPENAI_BASE_URL is configured), so it cannot answer. Your message is saved and a "
    "member of the team can reply here."
)
UNAVAILABLE_REPLY = (
    "Sorry, the assistant is unavailable right now. Your message is saved and a member of "
    "the team will follow up here."
)

# Given in the visitor's language: a model told in English how to sound tends to answer in
# English, whatever the visitor wrote.
TONE_INSTRUCTIONS = {
    "en": {
        "empathetic": "The visitor seems upset. Be especially empathetic, calm and supportive; "
        "acknowledge the problem before offering help.",
        "friendly": "The visitor is in a good mood. Keep a warm, friendly and upbeat tone.",
    },
    "es": {
        "empathetic": "El visitante parece molesto. Sé especialmente empático, sereno y "
        "comprensivo; reconoce el problema antes de ofrecer ayuda.",
        "friendly": "El visitante está de buen humor. Mantén un tono cálido, cercano y alegre.",
    },
    "pt": {
        "empathetic": "O visitante parece chateado. Seja especialmente empático, calmo e "
        "acolhedor; reconheça o problema antes de oferecer ajuda.",
        "friendly": "O visitante está de bom humor. Mantenha um tom caloroso, simpático e animado.",
    },
}
LANGUAGE_INSTRUCTIONS = {
    "en": "Always reply in English, the language the visitor writes in.",
    "es": "Responde siempre en español, el idioma en el que escribe el visitante.",
    "pt": "Responda sempre em português, o idioma em que o visitante escreve.",
}
# A last message shorter than this ("ok", "gracias") is read together with the visitor's
# previous ones to tell the language.
LANGUAGE_SAMPLE_LETTERS = 12

ROLE_FOR_SENDER = {"visitor": "user", "assistant": "assistant", "operator": "assistant"}


@dataclass
class ReplyResult:
    content: str = ""
    usage: dict | None = None
    cancelled: bool = False
    failed: bool = False
    error: str | None = None
    attempts: int = 0
    processing_ms: int = 0
    cut: bool = False  # text came, then a timeout ended the reply early

    @property
    def interrupted(self) -> str | None:
        """How the saved reply is labelled: "stopped" (the visitor), "cut" (a timeout)."""
        if self.cancelled:
            return "stopped"
        return "cut" if self.cut else None


def is_configured() -> bool:
    cfg = current_app.config
    return bool(cfg.get("OPENAI_API_KEY") or cfg.get("OPENAI_BASE_URL"))


_clients: dict[tuple[str, str | None], openai.OpenAI] = {}
_clients_lock = threading.Lock()


def client_or_none(timeout: float | None = None) -> openai.OpenAI | None:
    """The OpenAI-compatible client, shared by every thread of the process.

    Building one costs 30-50 ms (it loads the CA bundle even for http://) and throws its
    connection pool away: per reply that was a fifth of the time to first delta."""
    if not is_configured():
        return None
    cfg = current_app.config
    key = (cfg.get("OPENAI_API_KEY") or "not-needed", cfg.get("OPENAI_BASE_URL") or None)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = openai.OpenAI(
                api_key=key[0],
                base_url=key[1],
                max_retries=0,  # retries are ours, within the response budget
            )
    return client.with_options(
        timeout=timeout if timeout is not None else cfg.get("CHAT_RESPONSE_MAX_SECONDS", 100)
    )


def visitor_language(history: Iterable[tuple[str, str]]) -> str | None:
    """The language of the visitor's latest message(s), or None if they have no words."""
    from services.sentiment import detect_language

    sample: list[str] = []
    for sender, content in reversed(list(history)):
        if sender == "visitor" and content:
            sample.insert(0, content)
            if sum(ch.isalpha() for ch in " ".join(sample)) >= LANGUAGE_SAMPLE_LETTERS:
                break
            if len(sample) == 3:
                break
    return detect_language(" ".join(sample)) if sample else None


def build_messages(
    system_prompt: str,
    tone: str | None,
    history: Iterable[tuple[str, str]],
    language: str | None = None,
) -> list[dict[str, str]]:
    """The model's messages: the agent's prompt with the tone and reply-language instructions
    in the visitor's language (detected from the history when not given), then the history."""
    history = list(history)
    language = language or visitor_language(history)
    system = system_prompt.strip() or "You are a helpful assistant."
    tones = TONE_INSTRUCTIONS.get(language or "en") or TONE_INSTRUCTIONS["en"]
    if tone in tones:
        system += "\n\n" + tones[tone]
    if language:
        system += "\n\n" + LANGUAGE_INSTRUCTIONS.get(
            language, f"Always reply in the language the visitor writes in ({language})."
        )
    messages = [{"role": "system", "content": system}]
    for sender, content in history:
        role = ROLE_FOR_SENDER.get(sender)
        if role and content:
            messages.append({"role": role, "content": content})
    return messages


def _retryable(exc: Exception) -> bool:
    if isinstance(exc, openai.APITimeoutError | openai.APIConnectionError | openai.RateLimitError):
        return True
    return isinstance(exc, openai.APIStatusError) and exc.status_code >= 500


def retry_after_seconds(exc: Exception) -> float | None:
    """How long the provider asks us to wait (Retry-After / retry-after-ms), if it says."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


@dataclass(frozen=True)
class ReplyTimeouts:
    """A streamed reply's limits, in seconds (see CHAT_FIRST_TOKEN_TIMEOUT and friends)."""

    first_token: float
    idle: float
    total: float

    @classmethod
    def from_config(cls) -> ReplyTimeouts:
        cfg = current_app.config
        return cls(
            first_token=float(cfg.get("CHAT_FIRST_TOKEN_TIMEOUT", 30.0)),
            idle=float(cfg.get("CHAT_STREAM_IDLE_TIMEOUT", 20.0)),
            total=float(cfg.get("CHAT_RESPONSE_MAX_SECONDS", 100.0)),
        )


class _Upstream:
    """One streamed request, read on a thread of its own into a queue, so the caller can keep
    its own clock: a silent model cannot hold it past a deadline or a visitor's Stop."""

    def __init__(self, client: openai.OpenAI, body: dict) -> None:
        self.events: queue.Queue[tuple[str, object]] = queue.Queue()
        self._stream: openai.Stream | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(
            target=self._read, args=(client, body), name="assistant-stream", daemon=True
        )
        self._thread.start()

    def _read(self, client: openai.OpenAI, body: dict) -> None:
        try:
            stream = client.post(
                "/chat/completions",
                body=body,
                cast_to=ChatCompletion,
                stream=True,
                stream_cls=openai.Stream[ChatCompletionChunk],
            )
        except Exception as exc:  # noqa: BLE001 - handed to the caller, which classifies it
            self.events.put(("error", exc))
            return
        with self._lock:
            self._stream = stream
            closed = self._closed
        if closed:
            self.close()
            return
        try:
            for chunk in stream:
                self.events.put(("chunk", chunk))
            self.events.put(("end", None))
        except Exception as exc:  # noqa: BLE001
            self.events.put(("error", exc))
        finally:
            stream.close()

    def close(self) -> None:
        """End the upstream request now: its socket is shut down, so a read blocked on it
        returns at once (closing alone would not wake it), and the provider sees us go."""
        with self._lock:
            self._closed = True
            stream = self._stream
        if stream is None:
            return  # still waiting for headers: _read closes it when they come
        network = stream.response.extensions.get("network_stream")
        sock = network.get_extra_info("socket") if network is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        else:
            stream.close()


def stream_reply(
    *,
    model: str,
    temperature: float,
    max_tokens: int,
    messages: list[dict[str, str]],
    on_delta: Callable[[str], None],
    should_cancel: Callable[[], bool] = lambda: False,
    cancel_check_interval: float = 0.05,
    timeouts: ReplyTimeouts | None = None,
    budget_seconds: float | None = None,
) -> ReplyResult:
    """Stream a reply. Until its first text it must start within `timeouts.first_token`
    (attempts, back-off and a 429's Retry-After all count); then no silence may last longer
    than `timeouts.idle`; and the whole reply ends at `timeouts.total` (or `budget_seconds`).
    A reply ended by a timeout after text came is kept and marked `cut`."""
    limits = timeouts or ReplyTimeouts.from_config()
    total = limits.total if budget_seconds is None else min(limits.total, budget_seconds)
    started = time.monotonic()
    end_at = started + total
    first_by = min(started + limits.first_token, end_at)
    result = ReplyResult()
    parts: list[str] = []
    backoff = 0.25
    body = {
        "model": model,
        "temperature": temperature,
        "max_tokens": max_tokens,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    last_check = 0.0

    def cancelled() -> bool:
        nonlocal last_check
        now = time.monotonic()
        if now - last_check < cancel_check_interval:
            return False
        last_check = now
        return should_cancel()

    while not result.cancelled:
        remaining = first_by - time.monotonic()
        if remaining <= 0:
            result.failed = True
            result.error = result.error or "no reply within the first-token timeout"
            break
        # The HTTP read timeout only backs up our own clock (a reader left behind ends).
        client = client_or_none(timeout=max(remaining, limits.idle) + 1)
        if client is None:
            result.failed, result.error = True, "not configured"
            break
        result.attempts += 1
        upstream = _Upstream(client, body)
        deadline = first_by  # until the first text; then the idle limit from each chunk
        failure: Exception | None = None
        try:
            while True:
                if cancelled():
                    result.cancelled = True
                    break
                now = time.monotonic()
                if now >= deadline:
                    if parts:
                        result.cut = True
                        result.error = (
                            "reply time limit" if deadline >= end_at else "stream went quiet"
                        )
                    else:
                        result.failed = True
                        result.error = "no reply within the first-token timeout"
                    break
                try:
                    kind, value = upstream.events.get(
                        timeout=min(deadline - now, cancel_check_interval)
                    )
                except queue.Empty:
                    continue
                if kind == "end":
                    break
                if kind == "error":
                    failure = value  # type: ignore[assignment]
                    break
                chunk: ChatCompletionChunk = value  # type: ignore[assignment]
                if chunk.usage is not None:
                    result.usage = {
                        "prompt_tokens": chunk.usage.prompt_tokens,
                        "completion_tokens": chunk.usage.completion_tokens,
                        "total_tokens": chunk.usage.total_tokens,
                    }
                for choice in chunk.choices:
                    text = choice.delta.content if choice.delta else None
                    if text:
                        parts.append(text)
                        on_delta(text)
                if parts:
                    deadline = min(time.monotonic() + limits.idle, end_at)
        finally:
            upstream.close()  # a cancel or timeout ends the upstream request too
        if failure is None:
            break
        result.error = f"{type(failure).__name__}: {failure}"[:500]
        if parts:
            result.cut = True  # the text so far is kept, marked as incomplete
            break
        if not _retryable(failure):
            result.failed = True
            break
        wait = retry_after_seconds(failure)
        if wait is None:
            wait, backoff = backoff, min(backoff * 2, 4.0)
        if time.monotonic() + wait >= first_by:
            # The provider asks for longer than the reply may take to start: give up now
            # rather than hammer it, or sit out a wait that cannot end in time.
            result.failed = True
            break
        log.warning("assistant attempt %s failed (%s); retrying", result.attempts, failure)
        wake_at = time.monotonic() + wait
        while time.monotonic() < wake_at:
            if cancelled():
                result.cancelled = True
                break
            time.sleep(min(cancel_check_interval, max(0.0, wake_at - time.monotonic())))
    result.content = "".join(parts)
    result.processing_ms = int((time.monotonic() - started) * 1000)
    return result


def complete(messages: list[dict[str, str]], max_tokens: int = 300) -> str | None:
    """One non-streamed completion (summaries); None when not configured or failing."""
    client = client_or_none()
    if client is None:
        return None
    try:
        response = client.chat.completions.create(
            model=current_app.config["OPENAI_MODEL"],
            temperature=0.2,
            max_tokens=max_tokens,
            messages=messages,
        )
    except Exception as exc:  # noqa: BLE001
        log.warning("completion failed: %s", exc)
        return None
    return (response.choices[0].message.content or "").strip() or None
