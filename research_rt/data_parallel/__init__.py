"""Data parallelism: `launch_server --dp-size N` runs N research_rt servers behind sglang-router.

Each worker is a whole research_rt server (its own process, model copy, scheduler and radix cache)
with `--dp-size 1`, bound to a free port on 127.0.0.1. The CPUs this process may use are split into
N disjoint sets: worker i is pinned to set i (`sched_setaffinity`) and runs that many torch threads
(`OMP_NUM_THREADS`); on CUDA, worker i sees only GPU i (`CUDA_VISIBLE_DEVICES`) when there are N.
Once every worker answers `GET /health` with 200 (after its warm-up), sglang-router starts on the
requested --host/--port with `--policy cache_aware` (requests sharing a prefix go to the worker that
holds it) and the worker URLs; when it has registered them all, this logs `The server is fired up and
ready to roll!`.

One Ctrl-C (or SIGTERM) stops the router, then the workers. Children run in their own sessions (a
terminal's Ctrl-C reaches only this process, which stops them in order) and get SIGTERM if this
process dies. A worker that exits on its own is reported and removed from the router at once; the
others keep serving. If the router exits, or the last worker, everything stops with exit status 1.

Extra router flags can be given in the environment variable RESEARCH_RT_ROUTER_ARGS (shell-split,
appended last, so they override ours: e.g. `--policy power_of_two`).
"""
