"""Side-by-side benchmarks of pyctrd against Debian's containerd (``python -m bench run``).

Modules: ``harness`` (loop filesystem, daemons), ``proc`` (processes, /proc memory), ``clients``
(raw gRPC), ``fixtures`` (registry and images), ``figures*`` (what is measured), ``runner``
(gating, warm-up, A/B alternation), ``report`` (JSON, Markdown, chart), ``machine``.
"""
