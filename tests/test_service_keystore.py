"""Key store: the server's memory for clients' evaluation keys must stay bounded (LRU bytes cap, idle expiry)."""

import pytest

from medhe.service.keystore import KeyStore, KeyTooLarge


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_lru_eviction_keeps_total_under_cap():
    store = KeyStore(max_bytes=100, ttl=None)
    a = store.add("m", b"a", 40)
    b = store.add("m", b"b", 40)
    assert store.get(a.key_id) is not None  # a is now the most recently used
    c = store.add("m", b"c", 40)           # evicts b, the least recently used
    assert b.key_id not in store
    assert a.key_id in store and c.key_id in store
    assert store.total_bytes == 80


def test_idle_keys_expire_and_use_refreshes():
    clock = Clock()
    store = KeyStore(max_bytes=1000, ttl=10, clock=clock)
    a = store.add("m", b"a", 1)
    b = store.add("m", b"b", 1)
    clock.now = 8
    assert store.get(a.key_id) is not None
    clock.now = 15  # b idle for 15 s, a for 7 s
    assert store.get(b.key_id) is None
    assert store.get(a.key_id) is not None
    assert store.total_bytes == 1


def test_oversize_key_set_is_refused_and_ids_are_unguessable():
    store = KeyStore(max_bytes=10, ttl=None)
    with pytest.raises(KeyTooLarge, match="exceed"):
        store.add("m", b"x", 11)
    ids = {store.add("m", b"x", 1).key_id for _ in range(20)}
    assert len(ids) == 20 and all(len(i) >= 20 for i in ids)


def test_evicted_and_expired_entries_are_reported_removed_ones_not():
    clock, dropped = Clock(), []
    store = KeyStore(max_bytes=10, ttl=5, clock=clock, on_evict=dropped.append)
    a = store.add("m", 0, 6)
    b = store.add("m", 1, 6)          # evicts a (cap)
    assert [e.key_id for e in dropped] == [a.key_id]
    assert store.remove(b.key_id).value == 1 and store.remove(b.key_id) is None
    c = store.add("m", 2, 1)
    clock.now = 6
    assert c.key_id not in store      # expired
    assert [e.key_id for e in dropped] == [a.key_id, c.key_id]
    d = store.add("other", 3, 1)
    assert [e.key_id for e in store.remove_where(lambda e: e.model == "other")] == [d.key_id]
    assert store.total_bytes == 0 and len(store) == 0


def test_per_owner_and_count_caps_evict_least_recently_used():
    dropped = []
    store = KeyStore(max_bytes=1000, ttl=None, on_evict=dropped.append, max_count=4, max_per_owner=2)
    a1 = store.add("m", 0, 1, owner="a")
    a2 = store.add("m", 0, 1, owner="a")
    b1 = store.add("m", 0, 1, owner="b")
    store.get(a1.key_id)                  # a1 is now a's most recently used
    a3 = store.add("m", 0, 1, owner="a")  # a is at its cap: a's own LRU (a2) goes, not b's
    assert [e.key_id for e in dropped] == [a2.key_id]
    assert all(k in store for k in (a1.key_id, a3.key_id, b1.key_id))
    store.add("m", 0, 1, owner="c")
    store.add("m", 0, 1, owner="d")       # 5th set: the global LRU (b1) goes
    assert dropped[-1].key_id == b1.key_id and len(store) == 4


def test_key_secret_is_required_and_compared_on_hashes():
    from medhe.service.keystore import hash_secret

    store = KeyStore(max_bytes=100, ttl=None)
    e = store.add("m", "keys", 1, secret_hash=hash_secret("right"))
    assert store.get(e.key_id, "wrong") is None and store.get(e.key_id, "") is None
    assert store.get(e.key_id, "right") is e
    assert store.remove(e.key_id, "wrong") is None and e.key_id in store
    assert store.remove(e.key_id, "right") is e and e.key_id not in store
    assert b"right" not in e.secret_hash and len(e.secret_hash) == 32
