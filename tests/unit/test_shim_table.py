"""The keeper's process table (pyctr.shim.table): exit ownership and state commits, as plain code."""

from __future__ import annotations

from pyctr.shim.process.state import State
from pyctr.shim.table import Exit, Proc, ProcessTable, exit_status


def test_exit_status_from_wait_status() -> None:
    assert exit_status(7 << 8) == 7
    assert exit_status(9) == 128 + 9
    assert exit_status(0) == 0


def test_registered_process_claims_its_exit_once() -> None:
    table = ProcessTable()
    proc = Proc("c", "c", True)
    assert table.register(100, proc) is None
    claimed = table.on_exit(Exit(100, 3, 1.5))
    assert claimed is proc and proc.state is State.STOPPED and (proc.exit_status, proc.exited_at) == (3, 1.5)
    assert table.on_exit(Exit(100, 4, 2.0)) is None  # the pid is no longer ours (reused, say)
    assert proc.exit_status == 3


def test_exit_before_register_is_kept_while_the_window_is_open() -> None:
    """runc create returned, the init exited before the worker reported its pid."""
    table = ProcessTable()
    table.open_window()
    assert table.on_exit(Exit(200, 1, 1.0)) is None
    assert table.on_exit(Exit(201, 0, 1.0)) is None  # a grandchild: nobody's
    proc = Proc("c", "c", True)
    exit = table.register(200, proc)
    assert exit is not None and exit.pid == 200 and proc.state is State.STOPPED and proc.pid == 200
    assert 200 not in table.by_pid
    table.close_window()
    # Outside a window unclaimed exits are dropped: a later register of the same pid waits for its own.
    assert table.on_exit(Exit(300, 0, 1.0)) is None
    other = Proc("d", "d", True)
    assert table.register(300, other) is None and other.state is State.CREATED


def test_commit_skips_a_state_an_exit_overtook() -> None:
    proc = Proc("c", "c", True)
    before = proc.state
    proc.mark_exited(137, 1.0)  # the init died while runc start ran
    proc.commit(before, State.RUNNING)
    assert proc.state is State.STOPPED


def test_forget_drops_only_the_given_processes() -> None:
    table = ProcessTable()
    a, b = Proc("a", "c", True), Proc("b", "c", False)
    table.register(1, a)
    table.register(2, b)
    table.forget([b])
    assert table.by_pid == {1: a}
    assert table.on_exit(Exit(2, 0, 1.0)) is None and b.exited_at is None


def test_keeper_paths_run_in_process_without_forking() -> None:
    """The launcher's warm-up serves Connect/State/Wait, applies a worker result, runs direct.py's
    Start, Kill and Delete (``true`` for runc) and finishes an exit on a real keeper over a socket:
    a broken keeper path fails here, not in every shim. Every call is answered without an error."""
    import os

    from pyctr.shim import keeper

    before = set(os.listdir("/proc/self/task"))
    assert keeper.warm_up(rounds=2) == []
    assert set(os.listdir("/proc/self/task")) == before
    assert keeper.ids(b"\x0a\x01c\x12\x02e1") == ("c", "e1")
