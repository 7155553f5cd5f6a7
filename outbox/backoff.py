"""The kit's one backoff curve for waiting out an outage (relay and consumer),
and what a retry log line needs to know about the attempt that failed.

Kept apart from any loop so that the relay, the consumer and whatever comes
next (metrics push, another broker) wait the same way, and so that the
curve can be tested without waiting.
"""

from __future__ import annotations

from tenacity import RetryCallState, wait_exponential, wait_random
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


def backoff_delay(base: float, cap: float, attempt: int) -> float:
    """Seconds to wait after failed attempt number `attempt` (1, 2, ...) on the
    `backoff` curve, for a loop that counts its own failures instead of
    running under tenacity's `Retrying`."""
    state = RetryCallState(None, None, (), {})  # type: ignore[arg-type]  # only the count is read
    state.attempt_number = attempt
    return float(backoff(base, cap)(state))


def next_retry(state: RetryCallState) -> tuple[BaseException | None, float]:
    """For a tenacity `before_sleep=` hook: the exception the failed attempt
    raised (None if it returned) and the seconds until the next attempt."""
    exc = state.outcome.exception() if state.outcome is not None else None
    return exc, state.next_action.sleep if state.next_action is not None else 0.0
