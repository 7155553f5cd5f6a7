"""The RabbitMQ publisher: pika, publisher confirms, `mandatory`, persistent messages.

`OUTBOX_RELAY_PUBLISHER=rabbitmq` with `OUTBOX_RABBITMQ_URL`. Each event is
published to the exchange named by its topic (see `outbox.rabbitmq_topology`
for what sits behind it) with its key's routing bucket as the routing key
and the key as `cloudEvents:partitionkey`, `message_id` =
the event id, `delivery_mode` 2, `mandatory` set, and the CloudEvents
attributes as the AMQP binding maps them (`outbox.rabbitmq_wire`). The
`relay.publisher` contract, and how it is kept here:

- Acknowledged means the broker confirmed it (publisher confirms; a quorum
  queue confirms once a majority has written it to disk). Deletes follow
  confirms only.
- Confirms are pipelined: the whole batch is published on one confirm-mode
  channel and then the confirms (one `multiple` ack often covers many
  messages) are awaited together, bounded by `OUTBOX_RABBITMQ_CONFIRM_TIMEOUT`.
  pika's BlockingConnection waits for each message's confirm before the
  next publish, a round trip and a disk write per event; this publisher
  drives pika's own SelectConnection (its asynchronous adapter) until the
  batch's confirms are in, so the relay loop stays synchronous.
- Order: one channel, publishes in position order, and AMQP keeps a
  channel's order into each queue. A message refused before it is sent
  holds back the rest of its key (`send_in_key_order`).
- Unroutable (`mandatory` and nothing bound: the broker returns it before
  confirming it), an exchange that does not exist (asked once per topic
  with a passive declare, on a channel of its own, since a publish to a
  missing exchange closes the channel) are the event's own failures: counted and parked at
  `OUTBOX_RELAY_MAX_ATTEMPTS`, like a missing Kafka topic.
- Anything that leaves a message without an outcome (connection or channel
  lost, a nack, no confirm in time) is an outage: `attempted=False`, never
  counted against the event, retried with the relay's backoff. The
  connection is then dropped and made anew on the next round, so a late
  confirm can never be taken for another message's.

A refused login or vhost at start is a ConfigError (one line, no secret);
an unreachable broker is waited out.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import pika
import pika.exceptions as pe
from pika.adapters.select_connection import SelectConnection

from outbox.config import env_float, safe_url
from outbox.rabbitmq_topology import PARTITION_KEY_HEADER, routing_bucket
from outbox.rabbitmq_wire import connection_parameters, refusal, to_amqp
from relay.publisher import ACKNOWLEDGED, Delivery, Message
from relay.sending import every_outcome, send_in_key_order

log = logging.getLogger(__name__)

CONFIRM_TIMEOUT_ENV = "OUTBOX_RABBITMQ_CONFIRM_TIMEOUT"
DEFAULT_CONFIRM_TIMEOUT = 30.0  # seconds for a batch's confirms, as kafka's delivery_timeout_ms
CONNECT_TIMEOUT = 10.0
NO_OUTCOME = "no confirm: the connection or channel went away"


class _Refused(Exception):
    """A message that is not sent at all, for a reason of its own (`delivery`)."""

    def __init__(self, delivery: Delivery) -> None:
        super().__init__(delivery.error)
        self.delivery = delivery


def unroutable(topic: str) -> Delivery:
    return Delivery(False, (
        f"Unroutable: nothing is bound to exchange {topic!r} (no consumer group declared for this "
        f"topic); declare one: outbox rabbitmq declare --topic {topic} --group GROUP, then replay "
        "the parked events: outbox parked replay"), retriable=False)


def missing_exchange(topic: str) -> Delivery:
    return Delivery(False, (
        f"UnknownExchange: exchange {topic!r} does not exist on the broker; declare it: "
        f"outbox rabbitmq declare --topic {topic} --group GROUP, then replay the parked events: "
        "outbox parked replay"), retriable=False)


class _Link:
    """One SelectConnection and its confirm-mode channel, driven until a condition holds.

    Every pika callback lands here and may end the current `run`; nothing
    runs on another thread. Not reusable after `error` is set.
    """

    def __init__(self, parameters: Any, timeout: float) -> None:
        self.error: BaseException | None = None
        self.channel: Any = None
        self.next_tag = 1  # the confirm-mode channel numbers publishes from 1
        self.on_confirm: Callable[[bool, int, bool], None] = lambda ack, tag, multiple: None
        self.on_return: Callable[[str], None] = lambda message_id: None
        self._until: Callable[[], bool] | None = None
        self._ready = False
        self.conn = SelectConnection(
            parameters, on_open_callback=self._opened, on_open_error_callback=self._failed,
            on_close_callback=self._failed,
        )
        self.run(lambda: self._ready, timeout)
        if not self._ready:
            error = self.error or TimeoutError(f"no AMQP connection within {timeout:.0f}s")
            self.close()
            raise error

    # -- driving ---------------------------------------------------------------

    def run(self, until: Callable[[], bool], timeout: float) -> None:
        """Run pika's I/O loop until `until()` holds, the link fails, or `timeout` passes."""
        if until() or self.error is not None:
            return
        self._until = until
        timer = self.conn.ioloop.call_later(timeout, self.conn.ioloop.stop)
        try:
            self.conn.ioloop.start()
        finally:
            self.conn.ioloop.remove_timeout(timer)
            self._until = None

    def _poke(self) -> None:
        if self._until is not None and (self.error is not None or self._until()):
            self.conn.ioloop.stop()

    # -- callbacks -------------------------------------------------------------

    def _opened(self, conn: Any) -> None:
        conn.channel(on_open_callback=self._channel_opened)

    def _channel_opened(self, channel: Any) -> None:
        self.channel = channel
        channel.add_on_close_callback(self._channel_closed)
        channel.add_on_return_callback(self._returned)
        channel.confirm_delivery(ack_nack_callback=self._confirmed, callback=self._selected)

    def _selected(self, frame: Any) -> None:
        self._ready = True
        self._poke()

    def _failed(self, conn: Any, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self._poke()

    def _channel_closed(self, channel: Any, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self._poke()

    def _returned(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        self.on_return(properties.message_id)  # always before that message's confirm

    def _confirmed(self, frame: Any) -> None:
        method = frame.method
        self.on_confirm(isinstance(method, pika.spec.Basic.Ack), method.delivery_tag, method.multiple)
        self._poke()

    # -- operations ------------------------------------------------------------

    def publish(self, message: Message, properties: Any) -> int:
        self.channel.basic_publish(
            exchange=message.topic, routing_key=routing_bucket(message.key), body=message.value,
            properties=properties, mandatory=True,
        )
        tag = self.next_tag
        self.next_tag += 1
        return tag

    def exchange_exists(self, name: str, timeout: float) -> bool:
        """A passive declare on a channel of its own (a miss closes that channel, not ours)."""
        state: dict[str, Any] = {}

        def note(what: str, value: object) -> None:
            state.setdefault(what, value)
            self._poke()

        def opened(channel: Any) -> None:
            state["channel"] = channel
            channel.add_on_close_callback(lambda _channel, exc: note("closed", exc))
            channel.exchange_declare(exchange=name, passive=True, callback=lambda _frame: note("ok", True))

        self.conn.channel(on_open_callback=opened)
        self.run(lambda: "ok" in state or "closed" in state, timeout)
        if "ok" in state:
            state["channel"].close()
            return True
        closed = state.get("closed")
        if isinstance(closed, pe.ChannelClosedByBroker) and closed.reply_code == 404:
            return False
        raise self.error or closed or TimeoutError(f"no answer about exchange {name!r} in {timeout:.0f}s")

    def close(self) -> None:
        conn = self.conn
        try:
            if conn.is_open:
                conn.close()
                self.run(lambda: conn.is_closed, 5.0)
        except Exception:  # closing a broken link must not hide the real error
            log.debug("error while closing a RabbitMQ connection", exc_info=True)
        finally:
            conn.ioloop.close()


class RabbitMQPublisher:
    """`relay.publisher.Publisher` (and `Checked`) over RabbitMQ; see the module docstring."""

    def __init__(self, url: str, *, confirm_timeout: float = DEFAULT_CONFIRM_TIMEOUT) -> None:
        self._url = url
        self._parameters = connection_parameters(url)
        self._confirm_timeout = confirm_timeout
        self._link: _Link | None = None
        self._exchanges_seen: set[str] = set()
        log.info("rabbitmq publisher: %s confirm_timeout=%.1fs", safe_url(url), confirm_timeout)

    @classmethod
    def from_config(cls, config: Any) -> RabbitMQPublisher:
        """From a RelayConfig (its `rabbitmq_url`) and OUTBOX_RABBITMQ_CONFIRM_TIMEOUT."""
        timeout = env_float(CONFIRM_TIMEOUT_ENV, DEFAULT_CONFIRM_TIMEOUT, os.environ, minimum=0.1)
        return cls(config.rabbitmq_url, confirm_timeout=timeout)

    def check(self) -> None:
        """See `relay.publisher.Checked`: one connection; a refused login or vhost is a ConfigError."""
        self._connect()

    def publish(self, messages: Sequence[Message]) -> list[Delivery]:
        link = self._connect()
        try:
            missing = self._missing_exchanges(link, {m.topic for m in messages})
        except Exception:
            self.close()
            raise
        tags: dict[int, int] = {}  # delivery tag -> index in messages
        returned: set[str] = set()  # message ids the broker handed back as unroutable
        outcomes: list[Delivery | None] = [None] * len(messages)
        state = {"low": 0, "open": 0}  # confirms below `low` are all settled; how many await one

        def settle(tag: int, delivery: Delivery) -> None:
            index = tags.pop(tag, None)
            if index is not None and outcomes[index] is None:
                outcomes[index] = delivery
                state["open"] -= 1

        def confirmed(ack: bool, tag: int, multiple: bool) -> None:
            first = state["low"] if multiple else tag
            for each in range(first, tag + 1):
                index = tags.get(each)
                if index is None:
                    continue
                message = messages[index]
                if not ack:
                    settle(each, Delivery(False, "nacked by the broker", attempted=False))
                elif message.event_id in returned:
                    settle(each, unroutable(message.topic))
                else:
                    settle(each, ACKNOWLEDGED)
            if multiple:
                state["low"] = tag + 1

        def send(index: int, message: Message) -> None:
            if message.topic in missing:
                raise _Refused(missing_exchange(message.topic))
            content_type, headers = to_amqp(message.headers)
            headers[PARTITION_KEY_HEADER] = message.key.decode()
            properties = pika.BasicProperties(
                content_type=content_type, delivery_mode=2, message_id=message.event_id,
                headers=headers,
            )
            tag = link.publish(message, properties)
            tags[tag] = index
            state["open"] += 1

        def refused(exc: Exception) -> Delivery | None:
            return exc.delivery if isinstance(exc, _Refused) else None

        link.on_return = returned.add
        link.on_confirm = confirmed
        state["low"] = link.next_tag
        for index, known in enumerate(send_in_key_order(messages, send, refused)):
            if known is not None:  # refused before sending, or held back behind such a message
                outcomes[index] = known
        try:
            link.run(lambda: state["open"] == 0, self._confirm_timeout)
        except Exception as exc:  # the I/O loop itself failed: the link is gone
            link.error = link.error or exc
        if state["open"]:
            reason = (f"{NO_OUTCOME} ({type(link.error).__name__}: {link.error})" if link.error
                      else f"no confirm within {self._confirm_timeout:.1f}s")
            log.warning("rabbitmq: %d event(s) without a confirm: %s; dropping the connection",
                        state["open"], reason)
            for tag in list(tags):
                settle(tag, Delivery(False, reason, attempted=False))
            if isinstance(link.error, pe.ChannelClosedByBroker) and link.error.reply_code == 404:
                self._exchanges_seen.clear()  # an exchange went away: ask again next round
            self.close()
        elif link.error is not None:
            self.close()
        return every_outcome(outcomes, Delivery(False, "no outcome", attempted=False))

    def close(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            link.close()

    def _connect(self) -> _Link:
        if self._link is not None and self._link.error is None:
            return self._link
        if self._link is not None:  # lost between rounds (pika notices only while it runs)
            error = self._link.error
            log.warning("rabbitmq: connection lost (%s: %s); reconnecting", type(error).__name__, error)
        self.close()
        try:
            self._link = _Link(self._parameters, CONNECT_TIMEOUT)
        except Exception as exc:
            problem = refusal(exc, self._url)
            if problem is not None:
                raise problem from None
            raise ConnectionError(f"RabbitMQ at {safe_url(self._url)} not reachable: "
                                  f"{type(exc).__name__}: {exc}") from None
        return self._link

    def _missing_exchanges(self, link: _Link, topics: set[str]) -> set[str]:
        """Which of `topics` have no exchange: one passive declare per topic not seen before."""
        missing: set[str] = set()
        for topic in sorted(topics - self._exchanges_seen):
            if link.exchange_exists(topic, CONNECT_TIMEOUT):
                self._exchanges_seen.add(topic)
            else:
                missing.add(topic)
        return missing

