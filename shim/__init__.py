"""containerd-shim-pyrunc-v2: the runtime v2 shim, one per container (or per pod group), driving runc.

__main__   flags; the ``start`` and ``delete`` actions; serving otherwise (kept import-light)
start      the ``start`` action's steps (the daemon runs them in-process for its own shim)
launcher   the warm fork server that ``start`` asks for a serving process (shared memory)
server     the serving process: subreaper, log FIFO, then the keeper
keeper     the long-lived epoll loop: ttrpc on fd 3, cheap calls, reaping, stdio copies, events
direct     the calls the keeper serves by running runc itself (an init's Start, Kill, Delete, ...)
worker     one heavy call (Create, Exec, Update, ...) in a short-lived child of the keeper
table      the keeper's process table and exit ownership (plain code)
process/   the state table of init and exec processes; runc errors, the rootfs unmount
runc       the runc command driver (workers)  reaper   the workers' waiter for their children
io         stdio pipes, FIFOs, the console      events   the type URL of the events workers report
cgroups    Stats metrics and OOM watching       mount    mount(2) with containerd's options
bundle     the bundle directory's files         address  shim socket paths and the address file
container  the rootfs mount of Create
(hand-written protobuf for the messages without generated code: pyctr.api.pblite)
"""

import pyctr.api  # noqa: F401  (prepares betterproto2 before anything loads it)
