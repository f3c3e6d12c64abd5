"""The PostgreSQL ledger's schema, as numbered migrations.

``x402-engine ledger migrate`` applies the ones a database lacks, each in its own transaction,
recording it in ``schema_migrations``; an engine refuses to start on a database whose version
is not :data:`CURRENT` (too old: migrate first; newer: run the newer engine).

Portable on purpose: plain tables, ``BIGINT``/``NUMERIC``/``TEXT``/``BYTEA``, identity columns,
``ON CONFLICT``, recursive CTEs and row locks (``FOR UPDATE``), which CockroachDB and
YugabyteDB also run. Amounts are ``NUMERIC(78,0)`` (any uint256); events are append-only.
"""

from __future__ import annotations

MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "initial",
        """
CREATE TABLE instances (
    id BIGINT PRIMARY KEY,
    name TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    stopped_at TIMESTAMPTZ,
    successor BIGINT,
    taken_over_at TIMESTAMPTZ
);
CREATE TABLE counters (
    name TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
INSERT INTO counters (name, value) VALUES ('instance', 0), ('payment', 0), ('batch', 0);
CREATE TABLE payments (
    id BIGINT PRIMARY KEY,
    instance_id BIGINT NOT NULL,
    accepted_at_ms BIGINT NOT NULL,
    chain_id BIGINT NOT NULL,
    network TEXT NOT NULL,
    x402_version SMALLINT NOT NULL,
    token TEXT NOT NULL,
    payer TEXT NOT NULL,
    payee TEXT NOT NULL,
    value NUMERIC(78, 0) NOT NULL,
    valid_after NUMERIC(20, 0) NOT NULL,
    valid_before NUMERIC(20, 0) NOT NULL,
    nonce BYTEA NOT NULL,
    signature BYTEA NOT NULL,
    CONSTRAINT payments_replay_key UNIQUE (chain_id, token, payer, nonce)
);
CREATE INDEX payments_by_instance ON payments (instance_id, id);
CREATE INDEX payments_by_valid_before ON payments (valid_before);
CREATE TABLE payment_events (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    payment_id BIGINT NOT NULL,
    at_ms BIGINT NOT NULL,
    state TEXT NOT NULL,
    batch_id BIGINT,
    tx_hash TEXT,
    block_number BIGINT,
    gas_used BIGINT,
    fee_wei NUMERIC(78, 0),
    reason TEXT,
    message TEXT
);
CREATE INDEX payment_events_by_payment ON payment_events (payment_id, seq);
CREATE TABLE batches (
    id BIGINT PRIMARY KEY,
    instance_id BIGINT NOT NULL,
    chain_id BIGINT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    mode TEXT NOT NULL,
    signer TEXT NOT NULL,
    account_nonce BIGINT NOT NULL,
    item_count INTEGER NOT NULL,
    gas_limit BIGINT NOT NULL,
    max_fee_per_gas NUMERIC(78, 0) NOT NULL,
    tx_hash TEXT NOT NULL,
    raw_tx BYTEA NOT NULL,
    payment_ids BIGINT[] NOT NULL
);
CREATE INDEX batches_by_instance ON batches (instance_id, id);
CREATE TABLE batch_events (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    batch_id BIGINT NOT NULL,
    at_ms BIGINT NOT NULL,
    state TEXT NOT NULL,
    tx_hash TEXT,
    block_number BIGINT,
    gas_used BIGINT,
    effective_gas_price NUMERIC(78, 0),
    message TEXT
);
CREATE INDEX batch_events_by_batch ON batch_events (batch_id, seq);
CREATE TABLE batch_transactions (
    batch_id BIGINT NOT NULL,
    at_ms BIGINT NOT NULL,
    tx_hash TEXT NOT NULL,
    raw_tx BYTEA NOT NULL
);
CREATE INDEX batch_transactions_by_batch ON batch_transactions (batch_id);
CREATE TABLE sales (
    payment_id BIGINT PRIMARY KEY,
    at_ms BIGINT NOT NULL,
    mode TEXT NOT NULL,
    identifier TEXT,
    instance_id BIGINT NOT NULL
);
CREATE TABLE payer_locks (
    chain_id BIGINT NOT NULL,
    token TEXT NOT NULL,
    payer TEXT NOT NULL,
    PRIMARY KEY (chain_id, token, payer)
);
CREATE TABLE credit_open (
    payment_id BIGINT PRIMARY KEY,
    chain_id BIGINT NOT NULL,
    token TEXT NOT NULL,
    payer TEXT NOT NULL,
    value NUMERIC(78, 0) NOT NULL
);
CREATE INDEX credit_open_by_payer ON credit_open (chain_id, token, payer);
CREATE TABLE identifiers (
    identifier TEXT PRIMARY KEY,
    replay_key BYTEA NOT NULL,
    valid_before NUMERIC(20, 0) NOT NULL
);
CREATE TABLE commands (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind TEXT NOT NULL,
    payee TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE TABLE command_acks (
    command_id BIGINT NOT NULL,
    instance_id BIGINT NOT NULL,
    at TIMESTAMPTZ NOT NULL DEFAULT now(),
    waiting BIGINT NOT NULL,
    PRIMARY KEY (command_id, instance_id)
);
CREATE TABLE signer_leases (
    chain_id BIGINT NOT NULL,
    signer TEXT NOT NULL,
    instance_id BIGINT NOT NULL,
    epoch BIGINT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (chain_id, signer)
);
""",
    ),
    (
        2,
        "permit2 payments",
        """
ALTER TABLE payments ADD COLUMN method SMALLINT NOT NULL DEFAULT 0;
ALTER TABLE payments ADD COLUMN permitted NUMERIC(78, 0);
-- The contract whose nonces a payment uses: its token (EIP-3009) or Permit2 (all tokens).
ALTER TABLE payments ADD COLUMN nonce_space TEXT;
UPDATE payments SET nonce_space = token;
ALTER TABLE payments ALTER COLUMN nonce_space SET NOT NULL;
ALTER TABLE payments DROP CONSTRAINT payments_replay_key;
ALTER TABLE payments ADD CONSTRAINT payments_replay_key
    UNIQUE (chain_id, nonce_space, payer, nonce);
""",
    ),
    (
        3,
        "chain bindings",
        """
-- What chain this ledger settles on, bound at the first start on each chain: subject 'genesis'
-- holds the genesis block hash, each batcher address (lowercase 0x hex) the keccak256 of its
-- code. The first instance to bind a subject wins (INSERT ... ON CONFLICT DO NOTHING); a
-- ledger migrated from version 2 has none and is bound at the next start.
CREATE TABLE chain_bindings (
    chain_id BIGINT NOT NULL,
    subject TEXT NOT NULL,
    hash TEXT NOT NULL,
    bound_at_ms BIGINT NOT NULL,
    PRIMARY KEY (chain_id, subject)
);
""",
    ),
]

CURRENT = MIGRATIONS[-1][0]
