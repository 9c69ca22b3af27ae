"""Webhooks (lifelong.notify) against a real HTTP receiver on loopback: what a POST carries, its
signature, retries and giving up, and the commands that send them. The events of cycles, sweeps
and the endpoint are asserted where those run (test_continual, test_tune, test_serve)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import CONFIGS, WebhookReceiver
from lifelong import notify
from lifelong.config import NotifySection
from lifelong.registry import Registry
from lifelong.storage import Storage


def test_a_webhook_is_signed_retried_through_5xx_and_carries_the_event(monkeypatch):
    receiver = WebhookReceiver(failing=2, status=503)
    try:
        monkeypatch.setenv("HOOK_KEY", "s3cret")
        section = NotifySection(webhooks=[receiver.url], secret_env="HOOK_KEY", retries=3)
        (delivery,) = notify.event("sweep.finished", section, model="m", sweep="s", version=3)
        assert delivery.result(timeout=30) == 3  # two 503s, then taken
        assert len(receiver.posts) == 3
        ids = {p["headers"]["X-Lifelong-Delivery"] for p in receiver.posts}
        assert len(ids) == 1 and {p["body"] for p in receiver.posts} == {receiver.posts[0]["body"]}  # one event, tried again
        post = receiver.posts[-1]
        assert post["headers"]["X-Lifelong-Event"] == "sweep.finished" and post["headers"]["Content-Type"] == "application/json"
        assert notify.signature_ok("s3cret", post["body"], post["headers"]["X-Lifelong-Signature"])
        assert not notify.signature_ok("other", post["body"], post["headers"]["X-Lifelong-Signature"])
        assert {k: post["json"][k] for k in ("event", "model", "sweep", "version")} == {
            "event": "sweep.finished",
            "model": "m",
            "sweep": "s",
            "version": 3,
        }
    finally:
        receiver.close()


def test_a_receiver_that_refuses_or_is_down_is_named_once_and_nothing_raises(capsys, monkeypatch):
    monkeypatch.delenv("LIFELONG_WEBHOOK_SECRET", raising=False)
    refusing = WebhookReceiver(failing=100, status=400)
    try:
        (refused,) = notify.event("cycle.failed", NotifySection(webhooks=[refusing.url + "?token=abc"], retries=3), stream="s")
        assert refused.result(timeout=30) is None and len(refusing.posts) == 1  # a 4xx is not tried again
        assert "X-Lifelong-Signature" not in refusing.posts[0]["headers"]  # no key set: not signed
    finally:
        refusing.close()
    (down,) = notify.event("cycle.failed", NotifySection(webhooks=[refusing.url], retries=1, timeout_s=2), stream="s")
    assert down.result(timeout=30) is None
    out = capsys.readouterr().out
    assert f"webhook {refusing.url} did not take cycle.failed (HTTP 400; 1 tries)" in out
    assert f"webhook {refusing.url} did not take cycle.failed (ConnectError" in out and "2 tries" in out
    assert "token=abc" not in out


def test_models_promote_and_rollback_post_alias_moves_to_lifelong_webhooks(tmp_path, webhooks):
    """The commands that take no config send to LIFELONG_WEBHOOKS."""
    store = tmp_path / "store"
    registry = Registry(Storage(str(store)))
    model = tmp_path / "model"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)).save_pretrained(model)
    for _ in range(2):
        registry.register_version("hooked", model, {"task": "causal-lm", "metrics": {"val_loss": 1.0}})
    env = {**os.environ, "LIFELONG_WEBHOOKS": webhooks.url}
    for args in (["promote", "hooked:1", "--alias", "champion"], ["promote", "hooked:2", "--alias", "champion"], ["rollback", "hooked"]):
        done = subprocess.run(
            [sys.executable, "-m", "lifelong.cli", "models", *args, "--root", str(store)], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stdout + done.stderr
    moved = webhooks.wait_for("alias.moved", count=3)
    assert [(e["model"], e["alias"], e["previous"], e["version"], e["kind"]) for e in moved] == [
        ("hooked", "champion", None, 1, "promote"),
        ("hooked", "champion", 1, 2, "promote"),
        ("hooked", "champion", 2, 1, "rollback"),
    ]
    assert moved[0]["root"] == str(store) and moved[-1]["seq"] == 3


@pytest.mark.parametrize(
    ("where", "value", "message"),
    [
        ("override", "notify.webhooks=[ftp://host/x]", "notify: webhook 'ftp://host/x' is not an http(s) URL"),
        ("env", "not a url", "LIFELONG_WEBHOOKS: 'not' is not an http(s) URL"),
    ],
)
def test_a_webhook_that_is_not_an_http_url_is_refused_before_anything_runs(tmp_path, where, value, message):
    env = {**os.environ, **({"LIFELONG_WEBHOOKS": value} if where == "env" else {})}
    args = [os.path.join(CONFIGS, "gpt2", "tiny_pretrain.yaml"), f"storage.root={tmp_path}", *([value] if where == "override" else [])]
    done = subprocess.run([sys.executable, "-m", "lifelong.cli", "pretrain", *args], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
