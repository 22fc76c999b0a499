"""Region descriptions and captions from a multimodal LLM over the OpenAI-compatible chat API.

vLLM, SGLang, Ollama, llama.cpp's server and hosted APIs all serve ``POST {api_base}/chat/completions``.
Each image is one request: the prompt file's system message, its optional few-shot turns (image, answer),
then the user question with the image as a base64 data URL.

Robustness:
* at most ``concurrency`` requests in flight; each has a timeout;
* 429, 5xx, timeouts, connection errors and malformed responses are retried with exponential backoff and
  jitter (``Retry-After`` honoured), up to ``max_retries`` times, then recorded as failed (and retried on
  the next run);
* the first request runs alone: if the endpoint or model is wrong (404, 401/403, 400 naming the model) the
  run stops at once with an error saying which flag to check;
* every answer is appended to a JSONL shard as soon as it arrives (one shard per ``shard_size`` input images),
  so a killed run loses only its in-flight requests, and a restart skips every image already answered. A
  partly written last line (kill during a write) is cut off on restart.
* an answer that is empty, refused, or (for list prompts) not a bullet list is recorded as a failure of that
  image with its reason; it is not retried unless asked.
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import glob
import importlib.resources
import io
import json
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from PIL import Image

# Failures that a later run retries (transient); the others are answers and stay recorded.
TRANSIENT = ("http_429", "http_5xx", "timeout", "connection", "malformed_response")
REFUSAL_OPENERS = ("i'm sorry", "i am sorry", "sorry,", "i cannot", "i can't", "i can not", "i'm unable",
                   "i am unable", "as an ai")
BULLET = re.compile(r"^\s*(?:(?:[-*\u2022\u2023\u25e6]|\d+[.)])\s*)+")
SEND_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}


class SetupError(RuntimeError):
    """The server cannot serve this run (wrong endpoint, model name or key): stop, nothing per image."""


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A prompt file: ``system``, ``user``, ``max_tokens``, ``parse`` ("list" or "text"), optional
    ``few_shot`` [{"image": path, "answer": str}], ``temperature`` and ``detail`` (the image_url detail)."""
    name: str
    system: str
    user: str
    max_tokens: int = 300
    parse: str = "list"
    temperature: float = 0.0
    detail: str | None = None
    few_shot: tuple[tuple[str, str], ...] = ()

    @classmethod
    def load(cls, name_or_path: str, few_shot_root: str | None = None) -> "Prompt":
        """A prompt file path, or the name of one shipped in grain_jax/annotate/prompts (regions, caption,
        cub_regions). Few-shot image paths are relative to ``few_shot_root`` (default: the file's folder)."""
        if os.path.isfile(name_or_path):
            with open(name_or_path, encoding="utf-8") as f:
                raw, folder = json.load(f), os.path.dirname(os.path.abspath(name_or_path))
        else:
            shipped = importlib.resources.files("grain_jax.annotate") / "prompts" / f"{name_or_path}.json"
            if not shipped.is_file():
                raise FileNotFoundError(f"prompt {name_or_path!r} is neither a file nor one of {shipped_prompts()}")
            raw, folder = json.loads(shipped.read_text(encoding="utf-8")), None
        unknown = set(raw) - {"about", "system", "user", "max_tokens", "parse", "temperature", "detail", "few_shot"}
        if unknown or "user" not in raw or raw.get("parse", "list") not in ("list", "text"):
            raise ValueError(f"prompt {name_or_path}: needs 'user', 'parse' in (list, text); unknown keys {unknown}")
        root = few_shot_root or folder
        shots = []
        for shot in raw.get("few_shot", ()):
            path = shot["image"] if os.path.isabs(shot["image"]) or root is None else os.path.join(root, shot["image"])
            if not os.path.isfile(path):
                raise FileNotFoundError(f"prompt {name_or_path}: few-shot image {path} does not exist "
                                        "(set --few_shot_root)")
            shots.append((path, shot["answer"]))
        return cls(name=os.path.splitext(os.path.basename(name_or_path))[0], system=raw.get("system", ""),
                   user=raw["user"], max_tokens=int(raw.get("max_tokens", 300)), parse=raw.get("parse", "list"),
                   temperature=float(raw.get("temperature", 0.0)), detail=raw.get("detail"), few_shot=tuple(shots))


def shipped_prompts() -> list[str]:
    folder = importlib.resources.files("grain_jax.annotate") / "prompts"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def data_url(data: bytes, max_side: int = 0) -> str:
    """Encoded image -> ``data:<mime>;base64,...``; other formats (and images over ``max_side``) are re-encoded.
    Raises OSError/ValueError (PIL) for bytes that are not a readable image."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        mime = SEND_FORMATS.get(image.format or "")
        if mime is None or (max_side and max(image.size) > max_side):
            image = image.convert("RGB")
            if max_side and max(image.size) > max_side:
                image.thumbnail((max_side, max_side), Image.BICUBIC)
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=90)
            data, mime = buffer.getvalue(), "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def messages(prompt: Prompt, image_url: str, shot_urls: Iterable[str] = ()) -> list[dict]:
    def user(url):
        image = {"url": url} if prompt.detail is None else {"url": url, "detail": prompt.detail}
        return {"role": "user", "content": [{"type": "text", "text": prompt.user},
                                            {"type": "image_url", "image_url": image}]}

    turns = [{"role": "system", "content": prompt.system}] if prompt.system else []
    for url, (_, answer) in zip(shot_urls, prompt.few_shot):
        turns += [user(url), {"role": "assistant", "content": answer}]
    return turns + [user(image_url)]


class AnswerError(ValueError):
    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


def parse_answer(text: str | None, parse: str) -> list[str] | str:
    """An answer -> list of phrases (``parse="list"``: one per bullet line) or the stripped text.

    Raises AnswerError("empty_answer" | "refused" | "not_a_list").
    """
    text = (text or "").strip()
    if not text:
        raise AnswerError("empty_answer", "the model answered nothing")
    if text.lower().startswith(REFUSAL_OPENERS):
        raise AnswerError("refused", f"the model declined: {text[:80]!r}")
    if parse == "text":
        return " ".join(text.split())
    lines = [line for line in text.splitlines() if line.strip()]
    phrases = [BULLET.sub("", line).strip() for line in lines if BULLET.match(line)]
    phrases = [p for p in phrases if p]
    if not phrases:
        raise AnswerError("not_a_list", f"no bullet lines in the answer: {text[:80]!r}")
    return phrases


# --------------------------------------------------------------------------------------- storage
class ShardedJsonl:
    """Append-only JSONL results, one file per ``shard_size`` consecutive input images.

    Records: ``{"id", "ok": true, "value", "usage", ...}`` or ``{"id", "ok": false, "error", "detail"}``.
    The last record of an id wins (a failure retried later is superseded).
    """

    def __init__(self, directory: str, shard_size: int):
        self.directory, self.shard_size, self.files = directory, shard_size, {}
        os.makedirs(directory, exist_ok=True)

    def _path(self, shard: int) -> str:
        return os.path.join(self.directory, f"part-{shard:05d}.jsonl")

    def load(self) -> dict[str, dict]:
        """Every record so far; repairs a torn last line left by a kill."""
        records = {}
        for path in sorted(glob.glob(os.path.join(self.directory, "part-*.jsonl"))):
            with open(path, "rb") as f:
                data = f.read()
            good = data[:data.rfind(b"\n") + 1]
            if len(good) != len(data):
                with open(path, "r+b") as f:
                    f.truncate(len(good))
            for line in good.decode("utf-8").splitlines():
                record = json.loads(line)
                records[record["id"]] = record
        return records

    def append(self, index: int, record: dict) -> None:
        shard = index // self.shard_size
        if shard not in self.files:
            self.files[shard] = open(self._path(shard), "a", encoding="utf-8")
        f = self.files[shard]
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()


# --------------------------------------------------------------------------------------- client
@dataclasses.dataclass
class ClientConfig:
    api_base: str
    model: str
    api_key: str | None = None
    concurrency: int = 16
    timeout_s: float = 120.0
    max_retries: int = 6
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    max_image_side: int = 0
    extra_body: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.api_base.rstrip("/") + "/chat/completions"


@dataclasses.dataclass
class Usage:
    """Token counts the server reported (0 if it reports none)."""
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    seconds: float = 0.0

    def add(self, usage: Mapping[str, Any] | None) -> None:
        self.requests += 1
        if usage:
            self.prompt_tokens += int(usage.get("prompt_tokens") or 0)
            self.completion_tokens += int(usage.get("completion_tokens") or 0)


class _Transient(Exception):
    def __init__(self, kind: str, detail: str, retry_after: float | None = None):
        super().__init__(detail)
        self.kind, self.retry_after = kind, retry_after


def _retry_after(headers) -> float | None:
    try:
        return float(headers.get("retry-after"))
    except (TypeError, ValueError):
        return None


class Client:
    """Sends one prompt per image and turns the server's answer into a record (see module docstring)."""

    def __init__(self, config: ClientConfig, prompt: Prompt, usage: Usage | None = None):
        import httpx

        self.config, self.prompt, self.usage = config, prompt, usage or Usage()
        self.httpx = httpx
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self.http = httpx.AsyncClient(timeout=config.timeout_s, headers=headers,
                                      limits=httpx.Limits(max_connections=config.concurrency))
        self.shot_urls = []
        for path, _ in prompt.few_shot:
            with open(path, "rb") as f:
                self.shot_urls.append(data_url(f.read(), config.max_image_side))

    async def aclose(self) -> None:
        await self.http.aclose()

    def _setup_error(self, status: int, body: str) -> SetupError:
        hint = {401: "check the API key (--api_key_env)", 403: "check the API key and its permissions",
                404: "check --api_base (it ends in /v1, e.g. http://localhost:8000/v1) and --model"}.get(
                    status, "check --model and the server's limits")
        return SetupError(f"POST {self.config.url} (model {self.config.model!r}) answered HTTP {status}: "
                          f"{body[:300]}; {hint}")

    async def _post_once(self, payload: dict, first: bool) -> dict:
        httpx = self.httpx
        try:
            response = await self.http.post(self.config.url, json=payload)
        except httpx.TimeoutException as e:
            raise _Transient("timeout", f"no answer within {self.config.timeout_s} s ({type(e).__name__})")
        except httpx.TransportError as e:
            if first:
                raise SetupError(f"cannot reach {self.config.url}: {e}; check --api_base and that the server "
                                 "is running") from None
            raise _Transient("connection", f"{type(e).__name__}: {e}")
        status = response.status_code
        if status == 429:
            raise _Transient("http_429", "rate limited (429)", _retry_after(response.headers))
        if status >= 500 or status == 408:
            raise _Transient("http_5xx", f"HTTP {status}: {response.text[:200]}", _retry_after(response.headers))
        if status in (401, 403, 404) or (status >= 400 and (first or "model" in response.text.lower())):
            raise self._setup_error(status, response.text)
        if status >= 400:
            raise AnswerError(f"http_{status}", response.text[:300])
        try:
            body = response.json()
            choice = body["choices"][0]
            message = choice["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Transient("malformed_response", f"not a chat completion: {response.text[:200]!r}") from None
        self.usage.add(body.get("usage"))
        return {"message": message, "finish_reason": choice.get("finish_reason"), "usage": body.get("usage")}

    async def request(self, data: bytes, first: bool = False) -> dict:
        """Image bytes -> ``{"ok": True, "value", "usage", ...}`` or ``{"ok": False, "error", "detail"}``.
        Raises SetupError when the server cannot serve the run at all."""
        try:
            url = data_url(data, self.config.max_image_side)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            return {"ok": False, "error": "unreadable_image", "detail": f"{type(e).__name__}: {e}"}
        payload = {"model": self.config.model, "messages": messages(self.prompt, url, self.shot_urls),
                   "max_tokens": self.prompt.max_tokens, "temperature": self.prompt.temperature,
                   **self.config.extra_body}
        for attempt in range(self.config.max_retries + 1):
            try:
                answer = await self._post_once(payload, first)
                break
            except _Transient as e:
                if attempt == self.config.max_retries:
                    return {"ok": False, "error": e.kind, "detail": f"{e} (after {attempt + 1} attempts)"}
                self.usage.retries += 1
                delay = min(self.config.max_backoff_s, self.config.backoff_s * 2 ** attempt)
                await asyncio.sleep(e.retry_after if e.retry_after is not None else delay * random.uniform(0.5, 1))
            except AnswerError as e:
                return {"ok": False, "error": e.kind, "detail": str(e)}
        message, finish = answer["message"], answer["finish_reason"]
        record = {"usage": answer["usage"], "finish_reason": finish}
        if message.get("refusal") or finish == "content_filter":
            return {**record, "ok": False, "error": "refused",
                    "detail": str(message.get("refusal") or "content filter")[:200]}
        try:
            value = parse_answer(message.get("content"), self.prompt.parse)
        except AnswerError as e:
            return {**record, "ok": False, "error": e.kind, "detail": str(e), "answer": message.get("content")}
        if finish == "length" and self.prompt.parse == "list" and len(value) > 1:
            value = value[:-1]  # the last bullet was cut by max_tokens
        return {**record, "ok": True, "value": value, "answer": message.get("content")}


def needs_request(record: dict | None, retry_failed: bool) -> bool:
    if record is None:
        return True
    return not record["ok"] and (retry_failed or record["error"] in TRANSIENT)


async def run_async(items: list[tuple[str, Callable[[], bytes]]], store: ShardedJsonl, client: Client, *,
                    retry_failed: bool = False, progress: Callable[[dict], None] | None = None) -> dict[str, dict]:
    """Requests every item (id, image-bytes loader) not answered yet; returns all records by id."""
    done = store.load()
    todo = [(i, key, load) for i, (key, load) in enumerate(items) if needs_request(done.get(key), retry_failed)]
    limit = asyncio.Semaphore(client.config.concurrency)

    async def one(index: int, key: str, load: Callable[[], bytes], first: bool = False) -> None:
        try:
            try:
                data = await asyncio.to_thread(load)
            except OSError as e:
                record = {"ok": False, "error": "unreadable_image", "detail": f"{type(e).__name__}: {e}"}
            else:
                record = await client.request(data, first=first)
            record = {"id": key, "prompt": client.prompt.name, **record}
            store.append(index, record)
            done[key] = record
            if progress:
                progress(record)
        finally:
            limit.release()

    try:
        if todo:
            await limit.acquire()
            await one(*todo[0], first=True)  # a wrong endpoint / model fails here, alone
        tasks = set()
        for index, key, load in todo[1:]:
            await limit.acquire()
            task = asyncio.create_task(one(index, key, load))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        results = await asyncio.gather(*list(tasks), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]
    finally:
        store.close()
        await client.aclose()
    return done


def describe(items: list[tuple[str, Callable[[], bytes]]], directory: str, config: ClientConfig, prompt: Prompt,
             *, shard_size: int = 10000, retry_failed: bool = False, price_in: float = 0.0,
             price_out: float = 0.0, show_progress: bool = True) -> tuple[dict[str, dict], Usage]:
    """Runs ``prompt`` on every image (resumable); ``price_in``/``price_out`` in currency per 1M tokens."""
    from tqdm import tqdm

    usage = Usage()
    store = ShardedJsonl(directory, shard_size)
    total = len(items)
    done = store.load()
    bar = tqdm(total=total, unit="img", desc=prompt.name, disable=not show_progress, dynamic_ncols=True,
               smoothing=0.1, initial=sum(not needs_request(done.get(key), retry_failed) for key, _ in items))
    start = time.monotonic()

    def progress(record: dict) -> None:
        bar.update(1)
        cost = (usage.prompt_tokens * price_in + usage.completion_tokens * price_out) / 1e6
        bar.set_postfix(tok_in=usage.prompt_tokens, tok_out=usage.completion_tokens, retries=usage.retries,
                        **({"cost": f"{cost:.2f}"} if price_in or price_out else {}), refresh=False)

    client = Client(config, prompt, usage)
    try:
        records = asyncio.run(run_async(items, store, client, retry_failed=retry_failed, progress=progress))
    finally:
        bar.close()
    usage.seconds = time.monotonic() - start
    return records, usage
