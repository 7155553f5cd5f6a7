"""The kit's one backoff curve for waiting out an outage (relay and consumer).

Kept apart from any loop so that the relay, the consumer and whatever comes
next (metrics push, another broker) wait the same way, and so that the
curve can be tested without waiting.
"""

from __future__ import annotations

from tenacity import wait_exponential, wait_random
from tenacity.wait import wait_base


def backoff(base: float, cap: float) -> wait_base:
    """A tenacity `wait=` strategy: `base`, `2 * base`, `4 * base`, ... seconds,
    never more than `cap`, plus up to `base` of random jitter.

    The jitter keeps processes restarted together (a deploy, a broker that
    comes back) from retrying in lockstep. `base` > 0 and `cap` >= `base`,
    in seconds; the callers' configs check that. Use it as
    `Retrying(wait=backoff(config.backoff_initial, config.backoff_max), ...)`.
    """
    # tenacity deprecates wait_exponential_jitter(initial=...); this is the same curve.
    return wait_exponential(multiplier=base, max=cap) + wait_random(0, base)
