"""What the tests, the benchmark and the payments demo share to run the kit around them.

    devstack.py      the local services' addresses, read in one place

Development tooling, never shipped: the wheel holds `outbox` and `relay` only
(pyproject.toml lists its packages). It imports nothing from `tests`,
`bench` or `examples`, so each of them can import it without importing the
others.
"""
