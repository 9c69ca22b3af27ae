"""The endpoint's live gates and promotion watch (continual.promotion), decided by the follower's
own code on a real registry, from tallies as the replicas report them (no Ray: the Serve app
around it is exercised in test_closed_loop.py)."""

import asyncio
import time

import pytest

from conftest import WebhookReceiver, make_config, register_tiny
from lifelong.registry import Registry
from lifelong.serve import AliasFollower, Counted, serve_settings
from lifelong.storage import Storage


def tally(version: int, role: str, answers: int, *, errors: int = 0, agreed: int | None = None, ms: float = 5.0) -> Counted:
    return Counted(
        version,
        role,
        answers=answers,
        errors=errors,
        agreed=answers if agreed is None else agreed,
        compared=answers if role == "shadow" else 0,
        ms=[ms] * min(answers, 512),
    )


def report(f, replica: str, tallies: list[Counted]) -> None:
    asyncio.run(f.report(replica, tallies))


@pytest.fixture
def follower(tmp_path, tiny_tokenizer, topic_rows, monkeypatch):
    """A follower (its class, not started as a Serve replica) over a registry with v1 champion and
    v2 a candidate in shadow. Its webhooks are delivered before the receiver closes."""
    from lifelong import notify

    hooks, sent, event = WebhookReceiver(), [], notify.event
    monkeypatch.setattr(notify, "event", lambda *args, **fields: sent.extend(event(*args, **fields)) or sent)
    root = tmp_path / "store"
    registry = Registry(Storage(str(root)))
    versions = [register_tiny(registry, "gated", tiny_tokenizer, tmp_path / "w", seed=s, export=False) for s in (1, 2)]
    registry.move_alias("gated", "champion", versions[0])
    registry.move_alias("gated", "challenger", versions[1], kind="candidate")
    config = make_config(
        "gpt2/tiny_continual.yaml",
        "name=gated",
        f"storage.root={root}",
        "serve.shadow.share=0.5",
        "continual.promotion.shadow_requests=100",
        "continual.promotion.min_agreement=0.9",
        "continual.promotion.max_p95_ms=50",
        "continual.promotion.watch_s=600",
        "continual.promotion.min_requests=50",
        f'notify.webhooks=["{hooks.url}"]',
    )
    cls = AliasFollower.func_or_class
    f = cls.__new__(cls)  # the state __init__ sets, without the polling thread
    f.settings, f.registry = serve_settings(config), registry
    f.active, f.shadow, f.shadow_error, f.watch, f.watches, f.judged = versions[0], versions[1], None, None, [], set()
    f.tallies, f.shadowing, f.reported_at, f.accuracy = {}, {}, {}, {}
    yield f, registry, versions, hooks
    for delivery in sent:
        delivery.result(timeout=60)
    hooks.close()


def test_a_candidate_is_judged_only_after_its_quota_and_stays_challenger_outside_the_bounds(follower):
    f, registry, (v1, v2), hooks = follower
    report(f, "r1", [tally(v1, "champion", 300), tally(v2, "shadow", 99, agreed=70, ms=80.0)])
    f._live_gates()
    assert registry.alias_version("gated", "champion") == v1 and registry.alias_pointer("gated", "challenger")["kind"] == "candidate"
    report(f, "r2", [tally(v2, "shadow", 1, agreed=1, ms=80.0)])  # the quota is over every replica's answers
    f._live_gates()
    pointer = registry.alias_pointer("gated", "challenger")
    assert registry.alias_version("gated", "champion") == v1 and pointer["kind"] == "live-rejected" and pointer["version"] == v2
    assert "agreement with the champion 0.710 < 0.9" in pointer["reason"] and "p95 80.0 ms > 50.0 ms" in pointer["reason"]
    assert "100 shadow answers" in pointer["reason"]
    [event] = hooks.wait_for("live.rejected", timeout=10)
    assert event["version"] == v2 and event["champion"] == v1 and event["reason"] == pointer["reason"]
    f._live_gates()  # judged once
    assert len(registry.history("gated", "challenger")) == 2


def test_a_candidate_within_the_bounds_is_promoted_and_an_erring_champion_is_rolled_back(follower):
    f, registry, (v1, v2), hooks = follower
    report(f, "r1", [tally(v1, "champion", 300, errors=1), tally(v2, "shadow", 100, agreed=95, ms=10.0)])
    f._live_gates()
    promoted = registry.alias_pointer("gated", "champion")
    assert (
        promoted["version"] == v2 and promoted["kind"] == "promote" and promoted["reason"].startswith("passed the live gates (100 shadow")
    )
    # The endpoint swapped (the commit starts the watch); the new champion errs on 10% of 60 answers.
    f._start_watch(v2, v1, promoted)
    f.active = v2
    report(f, "r1", [tally(v1, "champion", 300, errors=1), tally(v2, "champion", 40, errors=4)])
    f._watch_champion()
    assert registry.alias_version("gated", "champion") == v2, "judged before min_requests answers"
    report(f, "r1", [tally(v1, "champion", 300, errors=1), tally(v2, "champion", 60, errors=6)])
    f._watch_champion()
    rolled = registry.alias_pointer("gated", "champion")
    assert rolled["version"] == v1 and rolled["kind"] == "rollback"
    assert rolled["reason"] == f"live watch of gated:{v2}: error rate 0.100 vs 0.003 (max increase 0.01)"
    [event] = hooks.wait_for("live.rollback", timeout=10)
    assert event["version"] == v2 and event["restored"] == v1
    assert f.watch is None and f.watches[-1]["outcome"] == "rolled back"


def test_a_watch_that_finds_nothing_keeps_the_champion_and_a_restarted_follower_carries_it_on(follower):
    f, registry, (v1, v2), hooks = follower
    registry.move_alias("gated", "champion", v2, reason="by hand")
    f.active = v2
    f._resume_watch()  # as a follower that (re)started right after the move
    assert f.watch["version"] == v2 and f.watch["previous"] == v1 and f.watch["until"] > time.time() + 590
    report(f, "r1", [tally(v1, "champion", 300), tally(v2, "champion", 300, ms=6.0)])
    f._watch_champion()
    assert f.watch is not None and registry.alias_version("gated", "champion") == v2
    f.watch["until"] = time.time() - 1
    f._watch_champion()
    assert f.watch is None and f.watches[-1]["outcome"] == "kept" and registry.alias_version("gated", "champion") == v2


def test_a_candidate_whose_every_shadow_answer_failed_stays_challenger_saying_so(follower):
    f, registry, (v1, v2), hooks = follower
    failed = Counted(v2, "shadow", answers=100, errors=100)
    report(f, "r1", [tally(v1, "champion", 300), failed])
    f._live_gates()
    pointer = registry.alias_pointer("gated", "challenger")
    assert pointer["kind"] == "live-rejected" and registry.alias_version("gated", "champion") == v1
    assert pointer["reason"] == (
        "live gates: agreement with the champion none < 0.9; 100 shadow answer(s) failed (100 shadow answers: agreement none, p95 none)"
    )
