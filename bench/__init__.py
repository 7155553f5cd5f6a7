"""Benchmarks: how close the kit comes to the limits of PostgreSQL and Kafka on one machine.

`python -m bench` (full) or `python -m bench --quick` runs every measurement
and prints one table; each figure is a ratio against a limit measured in the
same run on the same machine, so the ratios travel and the absolute numbers
do not. See bench/README.md.

This package never runs inside the test suite and holds no timed assertions.
It truncates the kit's tables: point it at a database of its own.
"""
