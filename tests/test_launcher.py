"""The driver's own logic around Ray Train, without starting Ray (Ray's calls replaced)."""

import threading

from raytitan.ray import launcher


def test_a_lost_node_refreshes_the_view_the_next_group_is_sized_from(monkeypatch):
    views = iter([[{"NodeID": "a", "Alive": True}, {"NodeID": "b", "Alive": True}]] * 2
                 + [[{"NodeID": "a", "Alive": True}, {"NodeID": "b", "Alive": False}]])
    last = [{"NodeID": "a", "Alive": True}]
    monkeypatch.setattr(launcher.ray, "nodes", lambda: next(views, last))
    refreshed = threading.Event()
    monkeypatch.setattr(launcher, "_refresh_ray_cluster_view", refreshed.set)
    with launcher.NodeWatch(interval_s=0.01):
        assert refreshed.wait(timeout=10)


def test_no_refresh_while_every_node_stays(monkeypatch):
    polls = threading.Semaphore(0)

    def nodes():
        polls.release()
        return [{"NodeID": "a", "Alive": True}]

    calls = []
    monkeypatch.setattr(launcher.ray, "nodes", nodes)
    monkeypatch.setattr(launcher, "_refresh_ray_cluster_view", lambda: calls.append(1))
    with launcher.NodeWatch(interval_s=0.01):
        for _ in range(5):
            assert polls.acquire(timeout=10)
    assert calls == []


def test_a_node_that_joins_gets_a_snapshot_store(monkeypatch):
    views = iter([[{"NodeID": "a", "Alive": True}]] * 2 + [[{"NodeID": "a", "Alive": True}, {"NodeID": "b", "Alive": True}]])
    last = [{"NodeID": "a", "Alive": True}, {"NodeID": "b", "Alive": True}]
    monkeypatch.setattr(launcher.ray, "nodes", lambda: next(views, last))
    monkeypatch.setattr(launcher, "_refresh_ray_cluster_view", lambda: None)
    joined, seen = threading.Event(), []

    def on_join(alive):
        seen.append(set(alive))
        joined.set()

    with launcher.NodeWatch(interval_s=0.01, on_join=on_join):
        assert joined.wait(timeout=10)
    assert seen == [{"a", "b"}]  # once, with every node alive (the store keeper skips those it has)
