"""The tests' consumer process: `python -m tests.consumer_proc`, which is
`python -m harness.consumer_proc` under the name the tests have always used.

    python -m tests.consumer_proc --group G --topic T --expect N [--transaction-batch-size B]

One consumer process serves the tests and the benchmark, so it lives in
`harness/` (the benchmark must not import `tests`); see that module for the
options. `record_effect` and `EFFECT_TABLE_DDL` stay importable from here for
the tests that run the same handler in-process.
"""

from __future__ import annotations

import sys

from harness.consumer_proc import EFFECT_TABLE_DDL, main, record_effect

__all__ = ["EFFECT_TABLE_DDL", "main", "record_effect"]

if __name__ == "__main__":
    sys.exit(main())
