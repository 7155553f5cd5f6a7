"""What the tests, the benchmark and the payments demo share to run the kit around them.

    devstack.py      the local services' addresses, read in one place
    procs.py         child processes (relays, consumers): start, stop, SIGKILL, pause
    consumer_proc.py the kit's Consumer as a process of its own (`python -m harness.consumer_proc`)
    progress.py      progress bars (tqdm) with the rate counted from the bar's own start

Development tooling, never shipped: the wheel holds `outbox` and `relay` only
(pyproject.toml lists its packages). It imports nothing from `tests`,
`bench` or `examples`, so each of them can import it without importing the
others; the benchmark in particular no longer reaches into the example.
"""
