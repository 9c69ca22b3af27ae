"""`lifelong ui`: a small read-only web dashboard of one store, served on loopback.

Server-rendered (FastAPI + Jinja2 templates in `lifelong/templates/`, no build step, no script):
models (versions, cards, metrics, exports, alias history with time and reason), streams (cycles
with their decisions and reasons, the accuracy matrix as a heatmap, the CL metrics over time as a
chart, the ledger with quarantined files and why), sweeps (the trial table and the curves the
sweep drew) and, with `--endpoint`, the live endpoint's `/v1/model`. Every page reads the store
when it is asked for, so it shows what the store holds now.

Promote and rollback are the only writes, through the registry's own moves (atomic, logged,
notified); they need the token of `--token-file`. Without one the dashboard is read-only.
"""

from __future__ import annotations

import hmac
import io
import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path

import httpx
from fastapi import FastAPI, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup

from lifelong.errors import LifelongError
from lifelong.registry import Registry
from lifelong.storage import Storage

ENDPOINT_TOKEN_ENV = "LIFELONG_ENDPOINT_TOKEN"  # a bearer token for --endpoint (serve.auth)


class NotFound(LifelongError):
    pass


class Dashboard:
    """What the pages show, read from the store on each request."""

    def __init__(self, root: str, token: str | None = None, endpoint: str | None = None):
        self.storage = Storage(root)
        self.registry = Registry(self.storage)
        self.token, self.endpoint = token, endpoint.rstrip("/") if endpoint else None

    # --- models -----------------------------------------------------------------------------
    def models(self) -> list[dict]:
        out = []
        for name in self.registry.models():
            versions = self.registry.versions(name)
            latest = self.registry.card(name, versions[-1]) if versions else None
            aliases = {a: p["version"] for a, p in sorted(self.registry.aliases(name).items())}
            out.append({"name": name, "versions": len(versions), "latest": latest, "aliases": aliases})
        return out

    def model(self, name: str) -> dict:
        if name not in self.registry.models():
            raise NotFound(f"no model '{name}' in {self.storage.root_uri}")
        aliases = self.registry.aliases(name)
        cards = [self.registry.card(name, v) for v in self.registry.versions(name)]
        rows = [
            {
                "card": c,
                "aliases": [a for a, p in sorted(aliases.items()) if p["version"] == c.version],
                "metrics": _val_metrics(c.metrics),
            }
            for c in reversed(cards)
        ]
        history = [{**e, "when": _when(e.get("moved_at"))} for e in reversed(self.registry.history(name))]
        return {"name": name, "rows": rows, "history": history, "aliases": aliases}

    def version(self, name: str, version: str) -> dict:
        if name not in self.registry.models() or not version.isdigit() or int(version) not in self.registry.versions(name):
            raise NotFound(f"no version '{version}' of model '{name}' in {self.storage.root_uri}")
        card = self.registry.card(name, int(version))
        history = card.run.history if card.run else []
        keys = sorted({k for h in history for k, v in h.items() if isinstance(v, (int, float)) and k not in ("epoch",)})
        return {"name": name, "card": card, "history": history, "history_keys": keys, "config": _pretty(card.config)}

    def promote(self, name: str, version: str, alias: str, reason: str) -> dict:
        if not version.isdigit():
            raise LifelongError(f"version '{version}' is not a number")
        return self.registry.move_alias(name, alias, int(version), reason=reason or "promoted in the dashboard")

    def rollback(self, name: str, alias: str, reason: str) -> dict:
        return self.registry.rollback(name, alias, reason=reason or "rolled back in the dashboard")

    # --- streams ----------------------------------------------------------------------------
    def streams(self) -> list[dict]:
        from lifelong.continual.ledger import Ledger
        from lifelong.continual.stream import Stream

        out = []
        for name in sorted(self.storage.listdir("streams")):
            state = Stream(self.storage, name).state()
            windows = state.get("windows", [])
            last = windows[-1] if windows else None
            out.append({"name": name, "windows": len(windows), "last": last, "ledger": Ledger(self.storage, name).counts()})
        return out

    def stream(self, name: str) -> dict:
        from lifelong.continual.ledger import Ledger
        from lifelong.continual.stream import Stream

        if name not in self.storage.listdir("streams"):
            raise NotFound(f"no stream '{name}' in {self.storage.root_uri}")
        stream = Stream(self.storage, name)
        state = stream.state()
        windows = state.get("windows", [])
        metric = state.get("metric", "accuracy")
        metrics = ("average_accuracy", "backward_transfer", "forward_transfer", "forgetting")
        series = {m: [(w["window"], w["metrics"][m]) for w in windows if _number((w.get("metrics") or {}).get(m))] for m in metrics}
        ledger = Ledger(self.storage, name)
        records = sorted(ledger.records(), key=lambda r: r.first_seen)
        return {
            "name": name,
            "metric": metric,
            "windows": [{**w, "when": _when(w.get("finished_at"))} for w in reversed(windows)],
            "heatmap": heatmap(windows, lower_is_better=metric == "perplexity"),
            "chart": line_chart({k: v for k, v in series.items() if v}),
            "unfinished": stream.unfinished(),
            "ledger": [{"record": r, "when": _when(r.first_seen)} for r in records],
            "counts": ledger.counts(records),
        }

    # --- sweeps -----------------------------------------------------------------------------
    def sweeps(self) -> list[dict]:
        out = []
        for name in sorted(self.storage.listdir("tune")):
            table = self._trials(name)
            if table is not None:
                statuses = table["status"].value_counts().to_dict() if "status" in table else {}
                out.append({"name": name, "trials": len(table), "statuses": statuses})
        return out

    def sweep(self, name: str) -> dict:
        table = self._trials(name)
        if table is None:
            raise NotFound(f"no sweep '{name}' in {self.storage.root_uri} (its tune/{name}/trials.csv is written when it ends)")
        columns = list(table.columns)
        rows = [[_cell(v) for v in row] for row in table.itertuples(index=False)]
        return {"name": name, "columns": columns, "rows": rows, "curves": self.storage.exists(f"tune/{name}/curves.png")}

    def curves(self, name: str) -> bytes:
        if name not in self.storage.listdir("tune") or not self.storage.exists(f"tune/{name}/curves.png"):
            raise NotFound(f"sweep '{name}' has no curves")
        return self.storage.read_bytes(f"tune/{name}/curves.png")

    def _trials(self, name: str):
        import pandas as pd

        rel = f"tune/{name}/trials.csv"
        if not self.storage.exists(rel):
            return None
        data = self.storage.read_bytes(rel)
        return pd.read_csv(io.BytesIO(data)) if data.strip() else pd.DataFrame()

    # --- the live endpoint --------------------------------------------------------------------
    def live(self) -> dict:
        if self.endpoint is None:
            return {"endpoint": None}
        token = os.environ.get(ENDPOINT_TOKEN_ENV)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            response = httpx.get(f"{self.endpoint}/v1/model", headers=headers, timeout=5)
        except httpx.HTTPError as e:
            return {"endpoint": self.endpoint, "error": f"{type(e).__name__}: {e}"}
        if response.status_code != 200:
            return {"endpoint": self.endpoint, "error": f"HTTP {response.status_code}: {response.text[:300]}"}
        try:
            return {"endpoint": self.endpoint, "model": response.json()}
        except ValueError:
            return {"endpoint": self.endpoint, "error": f"not JSON: {response.text[:300]}"}


def create_app(root: str, token: str | None = None, endpoint: str | None = None) -> FastAPI:
    dashboard = Dashboard(root, token, endpoint)
    templates = Environment(loader=PackageLoader("lifelong", "templates"), autoescape=select_autoescape(["html"]))
    app = FastAPI(title="lifelong", docs_url=None, redoc_url=None, openapi_url=None)

    def page(template: str, status: int = 200, **context) -> HTMLResponse:
        html = templates.get_template(template).render(store=dashboard.storage.root_uri, actions=dashboard.token is not None, **context)
        return HTMLResponse(html, status_code=status)

    @app.exception_handler(NotFound)
    def not_found(request: Request, e: NotFound):
        return page("message.html", 404, title="not found", message=str(e))

    @app.exception_handler(LifelongError)
    def refused(request: Request, e: LifelongError):
        return page("message.html", 400, title="refused", message=str(e))

    @app.get("/healthz")
    def healthz():
        return {"ok": True}

    @app.get("/", response_class=HTMLResponse)
    def overview():
        everything = {"models": dashboard.models(), "streams": dashboard.streams(), "sweeps": dashboard.sweeps()}
        return page("overview.html", endpoint=dashboard.endpoint, **everything)

    @app.get("/models/{name}", response_class=HTMLResponse)
    def model(name: str, moved: str | None = None):
        return page("model.html", moved=moved, **dashboard.model(name))

    @app.get("/models/{name}/{version}", response_class=HTMLResponse)
    def version(name: str, version: str):
        return page("version.html", **dashboard.version(name, version))

    def allowed(token: str) -> HTMLResponse | None:
        if dashboard.token is None:
            message = "this dashboard is read-only: start it with --token-file to allow promote and rollback"
            return page("message.html", 403, title="read-only", message=message)
        if not hmac.compare_digest(token.encode(), dashboard.token.encode()):
            return page("message.html", 403, title="refused", message="wrong token: nothing was changed")
        return None

    @app.post("/models/{name}/promote")
    def promote(name: str, version: str = Form(""), alias: str = Form("champion"), reason: str = Form(""), token: str = Form("")):
        denied = allowed(token)
        if denied is not None:
            return denied
        event = dashboard.promote(name, version, alias, reason)
        return RedirectResponse(f"/models/{name}?moved={alias}:{event['previous']}-{event['version']}", status_code=303)

    @app.post("/models/{name}/rollback")
    def rollback(name: str, alias: str = Form("champion"), reason: str = Form(""), token: str = Form("")):
        denied = allowed(token)
        if denied is not None:
            return denied
        event = dashboard.rollback(name, alias, reason)
        return RedirectResponse(f"/models/{name}?moved={alias}:{event['previous']}-{event['version']}", status_code=303)

    @app.get("/streams/{name}", response_class=HTMLResponse)
    def stream(name: str):
        return page("stream.html", **dashboard.stream(name))

    @app.get("/sweeps/{name}", response_class=HTMLResponse)
    def sweep(name: str):
        return page("sweep.html", **dashboard.sweep(name))

    @app.get("/sweeps/{name}/curves.png")
    def curves(name: str):
        return Response(dashboard.curves(name), media_type="image/png")

    @app.get("/live", response_class=HTMLResponse)
    def live():
        return page("live.html", **dashboard.live())

    return app


def serve(root: str, host: str, port: int, token_file: Path | None, endpoint: str | None) -> None:
    """Run the dashboard until interrupted (uvicorn; its access log in the log file)."""
    import uvicorn

    token = None
    if token_file is not None:
        if not token_file.is_file():
            raise LifelongError(f"--token-file {token_file}: no such file")
        token = token_file.read_text().strip()
        if not token:
            raise LifelongError(f"--token-file {token_file}: the file is empty")
    if "://" not in root and not Path(root).expanduser().is_dir():  # (Storage would make it)
        raise LifelongError(f"--root {root}: no store there (the directory `lifelong` commands write their storage.root to)")
    storage = Storage(root)
    app = create_app(root, token, endpoint)
    from lifelong.console import say

    say(f"lifelong ui: http://{host}:{port}/ (store {storage.root_uri}; {'promote/rollback with the token' if token else 'read-only'})")
    uvicorn.run(app, host=host, port=port, log_level="warning")


# --- server-drawn charts ----------------------------------------------------------------------
def heatmap(windows: list[dict], lower_is_better: bool = False) -> dict:
    """The matrix R (row i: the model after window i, scored on every window so far) as cells
    with a colour from red (worst) to green (best) over the matrix's own range."""
    rows = [(w["window"], [v if _number(v) else None for v in (w.get("row") or w.get("candidate") or [])]) for w in windows]
    values = [v for _, row in rows for v in row if v is not None]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    span = (high - low) or 1.0
    width = max((len(row) for _, row in rows), default=0)

    def cell(v):
        if v is None:
            return {"text": "", "style": ""}
        good = (v - low) / span
        good = 1 - good if lower_is_better else good
        return {"text": f"{v:.3f}", "style": f"background: hsl({good * 120:.0f}, 65%, 38%)"}

    shown = [{"window": k, "cells": [cell(v) for v in row] + [cell(None)] * (width - len(row))} for k, row in rows]
    return {"columns": list(range(width)), "rows": shown}


COLOURS = ("#2563eb", "#dc2626", "#16a34a", "#9333ea")


def line_chart(series: dict[str, list[tuple[float, float]]], width: int = 640, height: int = 240) -> Markup:
    """An inline SVG: one polyline per series, x = window, with its axes' ranges written out."""
    points = [p for s in series.values() for p in s]
    if not points:
        return Markup("<p class='dim'>no finished window yet</p>")
    pad = 36
    xs, ys = [x for x, _ in points], [y for _, y in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys + [0.0]), max(ys + [0.0])
    if math.isclose(x0, x1):
        x0, x1 = x0 - 1, x1 + 1
    if math.isclose(y0, y1):
        y0, y1 = y0 - 1, y1 + 1

    def at(x, y):
        return pad + (x - x0) / (x1 - x0) * (width - 2 * pad), height - pad - (y - y0) / (y1 - y0) * (height - 2 * pad)

    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img' aria-label='CL metrics by window'>"]
    ax, ay = at(x0, y0)
    bx, by = at(x1, y1)
    zx, zy = at(x0, 0.0)
    parts.append(f"<rect x='{ax}' y='{by}' width='{bx - ax}' height='{ay - by}' fill='none' stroke='#ccc'/>")
    parts.append(f"<line x1='{ax}' y1='{zy}' x2='{bx}' y2='{zy}' stroke='#999' stroke-dasharray='3 3'/>")
    parts.append(f"<text x='{ax}' y='{ay + 16}' font-size='11'>window {x0:g}</text>")
    parts.append(f"<text x='{bx - 60}' y='{ay + 16}' font-size='11'>window {x1:g}</text>")
    parts.append(f"<text x='2' y='{by + 4}' font-size='11'>{y1:.2f}</text><text x='2' y='{ay}' font-size='11'>{y0:.2f}</text>")
    for i, (name, values) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        coords = " ".join(f"{px:.1f},{py:.1f}" for px, py in (at(x, y) for x, y in values))
        parts.append(f"<polyline fill='none' stroke='{colour}' stroke-width='2' points='{coords}'/>")
        for px, py in (at(x, y) for x, y in values):
            parts.append(f"<circle cx='{px:.1f}' cy='{py:.1f}' r='3' fill='{colour}'/>")
        parts.append(f"<text x='{pad + i * 150}' y='14' font-size='12' fill='{colour}'>{Markup.escape(name)}</text>")
    parts.append("</svg>")
    return Markup("".join(parts))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _val_metrics(metrics: dict) -> str:
    return ", ".join(f"{k.removeprefix('val_')} {v:.4g}" for k, v in sorted(metrics.items()) if k.startswith("val_"))


def _when(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return str(value)[:19].replace("T", " ") + " UTC"


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _pretty(data) -> str:
    return json.dumps(data, indent=2, default=str)
