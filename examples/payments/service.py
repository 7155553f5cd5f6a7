"""The payment service: every state change and its event in one transaction.

Plain SQLAlchemy. Each method locks the payment row, checks the transition,
updates the row and calls `outbox.publish` in the same transaction, keyed by
the payment id, so the ledger sees a payment's events in the order they were
committed, and sees none of a transaction that rolled back.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import Engine, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

import outbox
from examples.payments.schema import payment

TOPIC = "payments"

# state -> the states it may move to, and the event type of each move
TRANSITIONS = {
    "created": {"authorised": "payment.authorised"},
    "authorised": {"captured": "payment.captured"},
    "captured": {"refunded": "payment.refunded"},
}


class PaymentError(Exception):
    """A payment cannot make the requested move."""


class TransitionError(PaymentError):
    """The payment's status does not allow the move; `status` is the one it has."""

    def __init__(self, payment_id: uuid.UUID, status: str, to: str) -> None:
        super().__init__(f"payment {payment_id} is {status}, cannot become {to}")
        self.payment_id, self.status, self.to = payment_id, status, to


@dataclass(frozen=True)
class Payment:
    id: uuid.UUID
    status: str
    version: int
    amount_minor: int
    currency: str


class PaymentService:
    def __init__(self, engine: Engine, *, topic: str = TOPIC) -> None:
        self.engine = engine
        self.topic = topic

    def create(
        self, *, idempotency_key: str, merchant: str, amount_minor: int, currency: str = "EUR"
    ) -> Payment:
        """Create a payment; calling again with the same idempotency key returns
        the first payment and writes nothing (a retried API call)."""
        if amount_minor <= 0:
            raise PaymentError("amount must be positive")
        with Session(self.engine) as session, session.begin():
            new_id = uuid.uuid4()
            inserted = session.execute(
                insert(payment)
                .values(
                    id=new_id, idempotency_key=idempotency_key, merchant=merchant,
                    amount_minor=amount_minor, currency=currency, status="created", version=1,
                )
                .on_conflict_do_nothing(index_elements=["idempotency_key"])
                .returning(payment.c.id)
            ).scalar_one_or_none()
            if inserted is None:
                row = session.execute(
                    select(payment).where(payment.c.idempotency_key == idempotency_key)
                ).one()
                return Payment(row.id, row.status, row.version, row.amount_minor, row.currency)
            outbox.publish(
                session, topic=self.topic, key=str(new_id), type="payment.created",
                data=_event_data(new_id, 1, amount_minor, currency, merchant),
            )
            return Payment(new_id, "created", 1, amount_minor, currency)

    def authorise(self, payment_id: uuid.UUID) -> Payment:
        return self._move(payment_id, "authorised")

    def capture(self, payment_id: uuid.UUID) -> Payment:
        return self._move(payment_id, "captured")

    def refund(self, payment_id: uuid.UUID) -> Payment:
        return self._move(payment_id, "refunded")

    def _move(self, payment_id: uuid.UUID, to: str) -> Payment:
        with Session(self.engine) as session, session.begin():
            row = session.execute(
                select(payment).where(payment.c.id == payment_id).with_for_update()
            ).one_or_none()
            if row is None:
                raise PaymentError(f"payment {payment_id} does not exist")
            event_type = TRANSITIONS.get(row.status, {}).get(to)
            if event_type is None:
                raise TransitionError(payment_id, row.status, to)
            version = row.version + 1
            session.execute(
                update(payment).where(payment.c.id == payment_id)
                .values(status=to, version=version, updated_at=func.now())
            )
            outbox.publish(
                session, topic=self.topic, key=str(payment_id), type=event_type,
                data=_event_data(payment_id, version, row.amount_minor, row.currency, row.merchant),
            )
            return Payment(payment_id, to, version, row.amount_minor, row.currency)


def _event_data(
    payment_id: uuid.UUID, version: int, amount_minor: int, currency: str, merchant: str
) -> dict[str, object]:
    return {
        "payment_id": str(payment_id),
        "version": version,
        "amount_minor": amount_minor,
        "currency": currency,
        "merchant": merchant,
    }
