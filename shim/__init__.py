"""containerd-shim-pyrunc-v2: the runtime v2 shim, one per container (or per pod group), driving runc.

__main__   flags; the ``start`` and ``delete`` actions; serving otherwise (kept import-light)
launcher   the warm fork server that ``start`` asks for a serving process (shared memory)
server     the serving process: subreaper, log FIFO, event loop, ttrpc server on fd 3
service    containerd.task.v2.Task: request decoding, events, exit handling
container  one container: init + exec processes, rootfs mounts, cgroup
process/   init and exec processes, and their state table (state.py)
runc       the runc command driver          reaper   the only waiter for children
io         stdio pipes, FIFOs, the console   events   the publisher to the daemon
cgroups    Stats metrics and OOM watching    mount    mount(2) with containerd's options
bundle     the bundle directory's files      address  shim socket paths and the address file
protowire  hand-written protobuf for the few messages without generated code
"""
