"""containerd-shim-pyrunc-v2: the runtime v2 shim, one per container (or per pod group), driving runc.

__main__   flags; the ``start`` and ``delete`` actions; serving otherwise (kept import-light)
launcher   the warm fork server that ``start`` asks for a serving process (shared memory)
server     the serving process: subreaper, log FIFO, then the keeper (or the asyncio server)
keeper     the long-lived epoll loop: ttrpc on fd 3, cheap calls, reaping, stdio copies, events
worker     one heavy call (Create, Start, Delete, ...) in a short-lived child of the keeper
table      the keeper's process table and exit ownership (plain code)
service    containerd.task.v2.Task on asyncio (PYCTR_SHIM_KEEPER=0): decoding, events, exits
container  one container: init + exec processes, rootfs mounts, cgroup
process/   init and exec processes, and their state table (state.py)
runc       the runc command driver          reaper   the only waiter for children
io         stdio pipes, FIFOs, the console   events   the publisher to the daemon
cgroups    Stats metrics and OOM watching    mount    mount(2) with containerd's options
bundle     the bundle directory's files      address  shim socket paths and the address file
(hand-written protobuf for the messages without generated code: pyctr.api.pblite)
"""
