"""Webhooks: a JSON POST to each configured URL when something happens that people act on.

Events: `alias.moved` (every promotion, rollback and challenger move, from any command),
`gate.rejected` (a cycle's candidate the gates turned down), `swap.refused` (a version the
endpoint would not load; the old one keeps serving), `live.rejected` (a candidate the endpoint's
live gates turned down), `live.rollback` (a champion the endpoint's watch rolled back),
`cycle.failed` and `sweep.finished`.

Where: `notify.webhooks` in a config (a command's `configure()` makes it the process's), plus
LIFELONG_WEBHOOKS (URLs separated by commas or spaces), which reaches the commands that take
no config (`lifelong models promote|rollback`). With neither, nothing is sent.

Each POST carries the event as JSON, `X-Lifelong-Event`, `X-Lifelong-Delivery` (the same id on
every try of one event) and, when the variable `notify.secret_env` names holds a key,
`X-Lifelong-Signature: sha256=HEX`, the HMAC-SHA256 of the body under that key. It is sent off the
caller's thread: a connection error, a 429 or a 5xx is tried again (`notify.retries` more times,
waiting 0.5, 1, 2 ... s); a receiver that still fails is named on the console, once per event.
The process waits for its deliveries before it exits. Delivery is at least once: a cycle carried
on after a crash may send its decision's event again (same fields, new delivery id).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import socket
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from urllib.parse import urlsplit

from lifelong.config import NotifySection
from lifelong.console import say
from lifelong.errors import ConfigError

ENV = "LIFELONG_WEBHOOKS"
_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lifelong-webhook")
_configured = NotifySection()


def configure(section: NotifySection) -> None:
    """The process's webhooks from now on (a command calls it with its config's section, before
    it starts anything: a LIFELONG_WEBHOOKS that is not a URL is refused here)."""
    global _configured
    webhooks(section)
    _configured = section


def webhooks(section: NotifySection | None = None) -> list[str]:
    """The section's URLs (the process's by default) and LIFELONG_WEBHOOKS's, in order, each once."""
    section = section or _configured
    from_env = [u for u in re.split(r"[\s,]+", os.environ.get(ENV, "")) if u]
    for url in from_env:
        try:
            NotifySection(webhooks=[url])
        except ValueError:
            raise ConfigError(f"{ENV}: {url!r} is not an http(s) URL") from None
    return list(dict.fromkeys([*section.webhooks, *from_env]))


def event(kind: str, section: NotifySection | None = None, /, **fields) -> list[Future]:
    """Send `kind` with `fields` to every webhook; returns the deliveries (each one's result: the
    number of tries it took, or None when it gave up). Never raises for a receiver's failure."""
    section = section or _configured
    urls = webhooks(section)
    if not urls:
        return []
    delivery = uuid.uuid4().hex
    payload = {"event": kind, "delivery": delivery, "time": datetime.now(timezone.utc).isoformat(), "host": socket.gethostname(), **fields}
    body = json.dumps(payload, default=str, sort_keys=True).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "lifelong-webhooks",
        "X-Lifelong-Event": kind,
        "X-Lifelong-Delivery": delivery,
    }
    secret = os.environ.get(section.secret_env, "")
    if secret:
        headers["X-Lifelong-Signature"] = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return [_pool.submit(_deliver, url, kind, body, headers, section.retries, section.timeout_s) for url in urls]


def signature_ok(secret: str, body: bytes, header: str) -> bool:
    """What a receiver checks (constant time): the header is the body's HMAC-SHA256 under the key."""
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, header or "")


def _deliver(url: str, kind: str, body: bytes, headers: dict, retries: int, timeout_s: float) -> int | None:
    import httpx

    why = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(0.5 * 2 ** (attempt - 1), 8.0))
        try:
            answer = httpx.post(url, content=body, headers=headers, timeout=timeout_s)
        except httpx.HTTPError as e:
            why = f"{type(e).__name__}: {str(e)[:200]}"
            continue
        if answer.status_code < 300:
            return attempt + 1
        why = f"HTTP {answer.status_code}"
        if answer.status_code < 500 and answer.status_code != 429:  # the receiver refuses it: trying again changes nothing
            break
    where = urlsplit(url)  # not the query: it may hold a token
    say(f"[lifelong] webhook {where.scheme}://{where.netloc}{where.path} did not take {kind} ({why}; {attempt + 1} tries)")
    return None
