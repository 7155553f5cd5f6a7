"""The SASL_SSL listener's users and ACLs, made sure of after every broker start.

Used by ``devstack/devstack``; not part of the library. The SCRAM users are
created when the storage is formatted (``StorageTool format --add-scram``);
this script adds any that an older ``.devstack`` (formatted before they
existed) lacks, and creates the ACLs, which no format step can make. Both are
idempotent. It talks to the PLAINTEXT listener, whose principal
(``User:ANONYMOUS``) is a super user of the devstack broker.

Passwords come from the environment (``OUTBOX_DEVSTACK_SCRAM_<USER>``), never
from the command line, where ``ps`` would show them.

    python devstack/kafka_security.py --bootstrap 127.0.0.1:19092 \\
        --relay outbox-relay --consumer outbox-ledger --topic-prefix secure. --group-prefix secure.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings


def scram_env(user: str) -> str:
    return "OUTBOX_DEVSTACK_SCRAM_" + user.upper().replace("-", "_")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--relay", required=True, help="SCRAM user that may write the prefixed topics")
    parser.add_argument("--consumer", required=True, help="SCRAM user that may read them and use the groups")
    parser.add_argument("--topic-prefix", required=True)
    parser.add_argument("--group-prefix", required=True)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)
    try:
        from kafka.admin import (
            ACL,
            ACLOperation,
            ACLPermissionType,
            ACLResourcePatternType,
            KafkaAdminClient,
            ResourcePattern,
            ResourceType,
            ScramMechanism,
            UserScramCredentialUpsertion,
        )
    except ImportError:
        print("kafka security: kafka-python is not installed here (run `make venv`); "
              "the SASL_SSL listener's users and ACLs were not checked", file=sys.stderr)
        return 1

    admin = KafkaAdminClient(bootstrap_servers=args.bootstrap, client_id="outbox-devstack-security",
                             request_timeout_ms=30_000)
    try:
        users = (args.relay, args.consumer)
        described = admin.describe_user_scram_credentials(list(users))
        missing = [u for u in users if not any(
            info["mechanism"] == ScramMechanism.SCRAM_SHA_512
            for info in (described.get(u) or {}).get("credential_infos") or ())]
        if missing:
            errors = admin.alter_user_scram_credentials([
                UserScramCredentialUpsertion(u, ScramMechanism.SCRAM_SHA_512, os.environ[scram_env(u)])
                for u in missing])
            failed = {u: e for u, e in errors.items() if e}
            if failed:
                print(f"kafka security: could not create SCRAM users: {failed}", file=sys.stderr)
                return 1

        def allow(user: str, operation: ACLOperation, kind: ResourceType, prefix: str) -> ACL:
            return ACL(f"User:{user}", "*", operation, ACLPermissionType.ALLOW,
                       ResourcePattern(kind, prefix, ACLResourcePatternType.PREFIXED))

        acls = [
            allow(args.relay, ACLOperation.WRITE, ResourceType.TOPIC, args.topic_prefix),
            allow(args.relay, ACLOperation.DESCRIBE, ResourceType.TOPIC, args.topic_prefix),
            allow(args.consumer, ACLOperation.READ, ResourceType.TOPIC, args.topic_prefix),
            allow(args.consumer, ACLOperation.DESCRIBE, ResourceType.TOPIC, args.topic_prefix),
            allow(args.consumer, ACLOperation.READ, ResourceType.GROUP, args.group_prefix),
        ]
        result = admin.create_acls(acls)  # an ACL that exists already is not an error
        if result["failed"]:
            print(f"kafka security: could not create ACLs: {result['failed']}", file=sys.stderr)
            return 1
    finally:
        admin.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
