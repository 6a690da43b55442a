"""Container processes: the state table of init and exec processes (state.py), runc's errors and the
rootfs unmount (init.py)."""
