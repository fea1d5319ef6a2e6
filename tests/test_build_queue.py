"""BuildQueue (engine/build_queue.py): every caller's build runs once, in arrival order, under
the lock; its value or exception comes back to its own caller; a burst's builds run back to back
in the thread that holds the lock."""

import threading

import pytest

from omnistream.engine.build_queue import BuildQueue


def test_value_and_exception_reach_their_own_caller():
    q = BuildQueue(threading.RLock())
    assert q.run(lambda: 41 + 1) == 42
    with pytest.raises(ValueError, match="bad build"):
        q.run(lambda: (_ for _ in ()).throw(ValueError("bad build")))
    assert q.run(lambda: "after") == "after"  # a failed build leaves the queue working


def test_burst_runs_each_build_once_in_order_and_combines():
    lock = threading.RLock()
    q = BuildQueue(lock)
    n, order, ran_in, results = 32, [], {}, {}

    def build(k):
        assert lock._is_owned()  # noqa: SLF001 - every build runs under the lock
        order.append(k)
        ran_in[k] = threading.get_ident()
        return k * k

    def caller(k):
        results[k] = (threading.get_ident(), q.run(lambda: build(k)))

    # hold the lock while the burst queues, so one caller then finds many builds to run
    with lock:
        threads = []
        for k in range(n):
            threads.append(threading.Thread(target=caller, args=(k,)))
            threads[-1].start()
            while len(q._pending) < k + 1:  # noqa: SLF001 - queued, in this order, before the next starts
                threading.Event().wait(0.0005)
    for t in threads:
        t.join()
    assert sorted(order) == list(range(n)) and order == list(range(n))  # once each, arrival order
    assert all(results[k][1] == k * k for k in range(n))
    others = sum(ran_in[k] != results[k][0] for k in range(n))
    assert others >= n - 1  # all but the first holder's own ran in the holder's thread


def test_reentrant_build_runs_at_once():
    q = BuildQueue(threading.RLock())
    assert q.run(lambda: q.run(lambda: 1) + 1) == 2
