"""lgc_fast.distributed: the ordered teardown of a gloo process group (the two-process run itself:
tests/test_train.py)."""
import threading

import torch.distributed as dist

import lgc_fast.distributed as distributed


def test_ranks_destroy_the_group_one_at_a_time_highest_first(monkeypatch):
    order = []
    monkeypatch.setattr(distributed.dist, "destroy_process_group",
                        lambda: order.append(threading.current_thread().name))
    store = dist.HashStore()
    store.add(distributed._OrderedTeardown.KEY, 7)  # an earlier group's count, as a store kept across restarts holds
    world = 4
    teardowns = [distributed._OrderedTeardown(store, rank, world) for rank in range(world)]
    threads = [threading.Thread(target=teardowns[rank].destroy, name=str(rank)) for rank in range(world)]
    for thread in threads:  # the lowest ranks first, so that each must wait for those above it
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert order == ["3", "2", "1", "0"]
    assert store.add(distributed._OrderedTeardown.KEY, 0) == 7 + world


def test_a_rank_closes_anyway_when_one_above_it_never_does(monkeypatch):
    monkeypatch.setattr(distributed._OrderedTeardown, "WAIT_S", 0.2)
    destroyed = []
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: destroyed.append(True))
    store = dist.HashStore()
    distributed._OrderedTeardown(store, 0, 2).destroy()  # rank 1 never closes
    assert destroyed == [True] and store.add(distributed._OrderedTeardown.KEY, 0) == 1
