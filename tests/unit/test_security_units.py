"""Pure logic of the security pieces: the GRANT statements and the broker refusals."""

from __future__ import annotations

import pytest
from kafka import errors as kafka_errors

from outbox.errors import ConfigError
from outbox.grants import Roles, grant_statements
from outbox.kafka_refusals import LostDuringSasl, not_authorized, raise_refusal, scrub


def test_grants_give_each_role_only_its_side() -> None:
    sql = grant_statements(Roles(writer="app", relay="relay", consumer="ledger"))
    writer = [s for s in sql if s.endswith(" TO app;")]
    assert "GRANT INSERT ON public.outbox_event TO app;" in writer
    assert not any("outbox_inbox" in s or "DELETE" in s or "SELECT" in s for s in writer)
    assert any("SECURITY DEFINER SET search_path = public, pg_temp" in s for s in sql)
    consumer = [s for s in sql if s.endswith(" TO ledger;")]
    assert not any("outbox_event" in s or "outbox_parked" in s for s in consumer)
    relay = [s for s in sql if s.endswith(" TO relay;")]
    assert not any("outbox_inbox" in s or "outbox_dead_letter" in s for s in relay)


def test_grants_quote_names_and_refuse_none() -> None:
    sql = grant_statements(Roles(consumer='Ledger "Team"'), schema="pay ments")
    assert 'GRANT USAGE ON SCHEMA "pay ments" TO "Ledger ""Team""";' in sql
    with pytest.raises(ConfigError):
        grant_statements(Roles())


CONFIG = {"sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_password": "s3cr3t-pw"}


def test_a_refused_sasl_login_or_handshake_is_one_config_error_without_the_secret() -> None:
    with pytest.raises(ConfigError) as login:
        raise_refusal([kafka_errors.SaslAuthenticationFailedError("bad creds s3cr3t-pw")], CONFIG)
    assert str(login.value).startswith("OUTBOX_KAFKA_SASL_PLAIN_PASSWORD:")
    assert "s3cr3t-pw" not in str(login.value)
    with pytest.raises(ConfigError) as tls:
        raise_refusal([kafka_errors.KafkaConnectionError("Handshake failed: certificate verify failed")], CONFIG)
    assert str(tls.value).startswith("OUTBOX_KAFKA_SSL_CAFILE:")


def test_connections_lost_during_sasl_count_as_a_refused_login_only_when_repeated() -> None:
    raise_refusal([LostDuringSasl("socket disconnected")], CONFIG)  # once: could be a restart
    raise_refusal([kafka_errors.KafkaConnectionError("Connection refused")] * 3, CONFIG)  # down
    with pytest.raises(ConfigError, match="closed every connection during SASL SCRAM-SHA-512"):
        raise_refusal([LostDuringSasl("socket disconnected")] * 2, CONFIG)


def test_not_authorized_names_the_user_and_the_setting() -> None:
    text = str(not_authorized("topic", {"b", "a"}, "read", "ledger"))
    assert text.startswith("OUTBOX_KAFKA_SASL_PLAIN_USERNAME:") and "user 'ledger' to read topic a, b" in text
    assert scrub("password=abc s3cr3t-pw", CONFIG) == "password=*** ***"
