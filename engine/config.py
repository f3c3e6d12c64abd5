"""Configuration: one typed Struct loaded from TOML; secrets (signer keys) from the environment.

Example (see README.md for every field)::

    [ledger]
    path = "x402-ledger.duckdb"

    [[chains]]
    chain_id = 8453
    network_names = ["base"]
    rpc_url = "http://127.0.0.1:8545"
    batcher = "0x..."
    signer_key_envs = ["X402_SIGNER_KEY"]

    [[chains.tokens]]
    address = "0x833589fcd6edb6e08f4c7c32d4f71b54bda02913"
    name = "USD Coin"
    version = "2"
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

SEND_MARGIN_S = 4  # an item must have this long before validBefore to be worth sending


def parse_utc_times(times: Sequence[str]) -> list[int]:
    """``["00:00", "12:30"]`` → seconds after midnight UTC, sorted; ValueError on bad input."""
    out: set[int] = set()
    for text in times:
        hours, sep, minutes = text.partition(":")
        if not sep or not (hours.isdigit() and minutes.isdigit()) or len(minutes) != 2:
            raise ValueError(f"time of day must be HH:MM (UTC), got {text!r}")
        h, m = int(hours), int(minutes)
        if not (0 <= h < 24 and 0 <= m < 60):
            raise ValueError(f"time of day out of range: {text!r}")
        out.add(h * 3600 + m * 60)
    if not out:
        raise ValueError("at least one time of day is required")
    return sorted(out)


class ConfigError(ValueError):
    """The configuration is unusable; the message says which field and why."""


# Field constraints are declared on the fields (msgspec checks them when the TOML is decoded,
# and validate() re-checks a configuration built in code); validate() keeps the rules that
# span fields.
Address = Annotated[str, Meta(pattern=r"^0x[0-9a-fA-F]{40}$")]
Positive = Annotated[int, Meta(ge=1)]
NonNegative = Annotated[int, Meta(ge=0)]
PositiveSeconds = Annotated[float, Meta(gt=0)]


def address_bytes(text: str) -> bytes:
    """A configured ``0x`` address (already pattern-checked) as the 20 bytes used inside."""
    raw = bytes.fromhex(text.removeprefix("0x").removeprefix("0X"))
    if len(raw) != 20:
        raise ConfigError(f"not an address: {text!r}")
    return raw


class TokenConfig(msgspec.Struct, forbid_unknown_fields=True):
    address: Address
    name: str  # EIP-712 domain name
    version: str  # EIP-712 domain version
    symbol: str = ""
    decimals: int = 6


class ChainConfig(msgspec.Struct, forbid_unknown_fields=True):
    chain_id: int
    rpc_url: str
    batcher: Address  # X402Batcher (compact entry point and aggregate3)
    tokens: Annotated[list[TokenConfig], Meta(min_length=1)]
    # names of environment variables holding 0x private keys
    signer_key_envs: Annotated[list[str], Meta(min_length=1)]
    network_names: list[str] = msgspec.field(default_factory=list)  # v1 names, e.g. "base"
    mode: Literal["compact", "aggregate3"] = "compact"
    # aggregate3 target; empty = the batcher (canonical Multicall3 works)
    multicall: Annotated[str, Meta(pattern=r"^(0x[0-9a-fA-F]{40})?$")] = ""
    confirmations: Positive = 1
    gas_per_tx_max: Positive = 16_777_216  # EIP-7825 cap, as on Base
    block_gas_limit: int = 30_000_000
    gas_per_item_estimate: int = 43_000  # planning figure: sizes batches before the simulation
    max_fee_per_gas_wei: int = 100_000_000_000  # never pay more than this per gas
    priority_fee_wei: int = 1_000_000
    max_inflight_batches: Positive = 4
    # Counterfactual smart wallets (ERC-6492): factories whose deployment call a payer's
    # signature may carry; empty (the default) refuses every one (fail closed)
    eip6492_factories: list[Address] = msgspec.field(default_factory=list)
    # Permit2 payers (x402 `exact` with assetTransferMethod "permit2"): Permit2 and the x402
    # exact proxy must be at their canonical addresses (checked at start). Compact mode only.
    permit2: bool = False
    # The x402 `upto` scheme (Permit2): this facilitator's X402OperatorBatcher, whose operators
    # are the signer accounts; payers name it as the facilitator that chooses the amount.
    # Empty (the default): `upto` is not offered.
    upto_batcher: Annotated[str, Meta(pattern=r"^(0x[0-9a-fA-F]{40})?$")] = ""
    # PostgreSQL ledger: signer accounts this instance leases, at most (0: every free one). With
    # N instances sharing K keys, K / N each lets all of them settle.
    signers_per_instance: NonNegative = 0
    poll_interval_ms: Positive = 200
    rebroadcast_after_s: PositiveSeconds = 6.0  # resend a signed batch not mined after this long
    simulate: bool = True  # eth_call each batch first and drop the items that would fail
    direct_single: bool = True  # send a batch of one as a plain transferWithAuthorization
    # aggregate3 mode: gas allowed per item (a transferWithAuthorization to a new holder costs
    # ~90k on Base with the sub-call overhead). A batch's limit is this times its items plus
    # calldata, proven by the simulation run at that limit: no eth_estimateGas per batch.
    aggregate3_gas_per_item_max: int = 120_000
    rpc_timeout_s: float = 10.0
    rpc_retries_max: int = 6

    @property
    def caip2(self) -> str:
        return f"eip155:{self.chain_id}"

    @property
    def batcher_address(self) -> bytes:
        return address_bytes(self.batcher)

    @property
    def upto_batcher_address(self) -> bytes | None:
        return address_bytes(self.upto_batcher) if self.upto_batcher else None

    @property
    def aggregate3_target(self) -> bytes:
        """Where aggregate3 calls go: the configured Multicall3, else the batcher."""
        return address_bytes(self.multicall or self.batcher)


PolicyMode = Literal["immediate", "windowed", "scheduled"]


class ScheduleConfig(msgspec.Struct, forbid_unknown_fields=True):
    """When accumulated payments are settled (see engine.rules.policy)."""

    mode: PolicyMode = "immediate"  # immediate: full batch or max_wait_ms
    window_s: Positive = 3600  # windowed: every window_s seconds, aligned to the epoch (UTC)
    times_utc: list[str] = msgspec.field(default_factory=lambda: ["00:00"])  # scheduled
    value_threshold: NonNegative = 0  # also settle once this much value waits (base units; 0: off)
    count_threshold: NonNegative = 0  # ... or this many payments wait (0: off)
    payer_unsettled_threshold: NonNegative = 0  # ... or one payer owes this much unsettled (0: off)


class PayeeScheduleConfig(ScheduleConfig, kw_only=True):
    payee: Address  # its payments get pools and a schedule of their own

    @property
    def payee_address(self) -> bytes:
        return address_bytes(self.payee)


class PolicyConfig(ScheduleConfig):
    max_batch_size: Positive = 400
    max_wait_ms: int = 500
    deadline_margin_s: int = 30  # flush when the earliest validBefore is this close
    payees: list[PayeeScheduleConfig] = msgspec.field(default_factory=list)


class IngestConfig(msgspec.Struct, forbid_unknown_fields=True):
    valid_before_margin_s: int = 6  # as the reference facilitator: validBefore >= now + 6 s
    valid_after_tolerance_s: int = 0  # accept validAfter up to this far in the future
    value_max: int = 2**128 - 1  # the compact entry point packs value in 16 bytes
    value_min: NonNegative = 1  # refuse smaller amounts (each payment costs a transfer's gas)
    # Worker processes that verify submitted payments (0: in the engine's own thread). Set it
    # to the number of cores for high ingest rates; each costs ~1 s at start and ~60 MB.
    verify_workers: Annotated[int, Meta(ge=0, le=64)] = 0
    verify_batch_max: Positive = 512  # payments sent to a worker in one message at most
    # Smart-wallet payers (EIP-1271) with 65-byte signatures: a signature that does not recover
    # to authorization.from is asked of the payer on chain (many per eth_call) before a refusal
    contract_signatures: bool = True
    # /verify (and a deferred /settle) ask the chain: balance, nonce used or cancelled, token
    # code. Concurrent questions share one aggregate3 eth_call; answers are reused this long.
    state_checks: bool = True
    state_max_age_ms: NonNegative = 1_000
    # wait this long for more questions to join a read
    state_window_ms: Annotated[float, Meta(ge=0)] = 2.0
    state_batch_max: Positive = 256  # payments per read, at most


class LedgerConfig(msgspec.Struct, forbid_unknown_fields=True):
    path: str = "x402-ledger.duckdb"
    group_max: Positive = 4096  # accepted payments made durable in one journal append at most
    # The write-ahead journal (<path>.journal/): an acknowledgement waits for one append and
    # fdatasync instead of a DuckDB commit. Off: every intake group is a DuckDB commit.
    journal: bool = True
    journal_segment_mb: Positive = 64
    flush_interval_ms: Positive = 50  # journaled payments reach DuckDB at least this often
    flush_rows: Positive = 2_000  # ... or as soon as this many wait
    # "postgres": many instances share one PostgreSQL database (see the README's deployment
    # section); path, journal and flush_* then do not apply.
    backend: Literal["duckdb", "postgres"] = "duckdb"
    dsn_env: str = "X402_LEDGER_DSN"  # environment variable holding the PostgreSQL DSN
    instance_name: str = ""  # this instance's name (default: the host name); a restart with
    # the same name resumes its own unfinished work at once instead of after the lease
    lease_s: PositiveSeconds = 10.0  # an instance silent this long is taken over by another


class CreditConfig(msgspec.Struct, forbid_unknown_fields=True):
    """Credit control for payments that wait for a window or a schedule
    (engine.rules.credit, engine.stages.credit_control)."""

    enabled: bool = True
    refresh_s: PositiveSeconds = 60.0  # re-read the balances of every payer who owes something
    balance_max_age_s: PositiveSeconds = 300.0  # older balances are read again before more credit
    payer_cap: NonNegative = 0  # most unsettled value one payer may owe per token (0: off)


SettlementMode = Literal["confirmed", "deferred"]


class ServiceConfig(msgspec.Struct, forbid_unknown_fields=True):
    """The HTTP facilitator (``x402-engine serve``)."""

    host: str = "127.0.0.1"
    port: int = 4021
    settlement: SettlementMode = "confirmed"
    payee_settlement: dict[Address, SettlementMode] = msgspec.field(default_factory=dict)
    settle_timeout_s: PositiveSeconds = 30.0  # confirmed mode: then answer settlement_pending
    body_max_bytes: Annotated[int, Meta(ge=1024)] = 65_536
    header_max_bytes: int = 16_384
    backlog: int = 2048  # pending TCP connections the listener queues
    bearer_token_env: str = ""  # env var with the token /verify and /settle then require
    allow_public_without_token: bool = False  # listen beyond loopback with no token
    # /healthz answers 503 when work waits (batches in flight, a batch waiting to be sent) and
    # nothing has progressed (no batch sent, no payment final) for this long.
    stall_after_s: PositiveSeconds = 120.0


class EngineConfig(msgspec.Struct, forbid_unknown_fields=True):
    chains: Annotated[list[ChainConfig], Meta(min_length=1)]
    ledger: LedgerConfig = msgspec.field(default_factory=LedgerConfig)
    policy: PolicyConfig = msgspec.field(default_factory=PolicyConfig)
    ingest: IngestConfig = msgspec.field(default_factory=IngestConfig)
    credit: CreditConfig = msgspec.field(default_factory=CreditConfig)
    service: ServiceConfig = msgspec.field(default_factory=ServiceConfig)
    channel_capacity: int = 64  # bounded memory channels between stages (in messages)


def validate(config: EngineConfig) -> EngineConfig:
    """The field constraints (for a configuration built in code too), then the rules that
    span fields."""
    try:
        msgspec.convert(msgspec.to_builtins(config), EngineConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(str(exc)) from None
    seen: set[int] = set()
    for i, chain in enumerate(config.chains):
        where = f"chains[{i}]"
        if chain.chain_id in seen:
            raise ConfigError(f"{where}: duplicate chain_id {chain.chain_id}")
        seen.add(chain.chain_id)
        if chain.gas_per_tx_max > chain.block_gas_limit:
            raise ConfigError(f"{where}: need gas_per_tx_max <= block_gas_limit")
        if (chain.permit2 or chain.upto_batcher) and chain.mode != "compact":
            raise ConfigError(f'{where}: permit2 and upto_batcher need mode = "compact"')
    seen_payees: set[str] = set()
    for i, schedule in enumerate([config.policy, *config.policy.payees]):
        where = "policy" if i == 0 else f"policy.payees[{i - 1}]"
        if isinstance(schedule, PayeeScheduleConfig):
            if schedule.payee.lower() in seen_payees:
                raise ConfigError(f"{where}: payee {schedule.payee} listed twice")
            seen_payees.add(schedule.payee.lower())
        _check_schedule(schedule, where)
    if config.ingest.valid_before_margin_s <= SEND_MARGIN_S:
        # Otherwise an authorization could be accepted that no batch may still be sent for.
        raise ConfigError(f"ingest.valid_before_margin_s must be > {SEND_MARGIN_S} (send margin)")
    if not 0 < config.ingest.value_max <= 2**128 - 1:  # beyond int64: not a field constraint
        raise ConfigError("ingest.value_max must be in (0, 2**128 - 1]")
    if config.ingest.value_min > config.ingest.value_max:
        raise ConfigError("ingest.value_min must be <= value_max")
    return config


def _check_schedule(schedule: ScheduleConfig, where: str) -> None:
    if schedule.mode == "scheduled":
        try:
            parse_utc_times(schedule.times_utc)
        except ValueError as exc:
            raise ConfigError(f"{where}.times_utc: {exc}") from exc


def load_config(path: str | Path) -> EngineConfig:
    """Read and validate a TOML configuration file."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"no configuration file {path} (x402-engine devchain writes devchain/engine.toml)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        config = msgspec.toml.decode(raw, type=EngineConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    except msgspec.DecodeError as exc:  # not TOML at all
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    return validate(config)


def dump_config(config: EngineConfig) -> bytes:
    return msgspec.toml.encode(config)


class SignerKey:
    """A private key read from the environment. Its repr never shows the key."""

    __slots__ = ("_key", "env_name")

    def __init__(self, env_name: str, key: bytes) -> None:
        self.env_name = env_name
        self._key = key

    @property
    def secret(self) -> bytes:
        return self._key

    def __repr__(self) -> str:
        return f"SignerKey(env={self.env_name!r}, key=<hidden>)"


def signer_keys(chain: ChainConfig, environ: dict[str, str] | None = None) -> list[SignerKey]:
    env = os.environ if environ is None else environ
    keys: list[SignerKey] = []
    for name in chain.signer_key_envs:
        value = env.get(name)
        if not value:
            raise ConfigError(
                f"environment variable {name} (signer key) is not set: pass --env-file (a"
                " devchain's is devchain/signer.env) or export it"
            )
        text = value.strip().removeprefix("0x")
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raise ConfigError(f"environment variable {name} is not a hex private key") from None
        if len(raw) != 32:
            raise ConfigError(f"environment variable {name} must hold a 32-byte private key")
        keys.append(SignerKey(name, raw))
    return keys


def read_env_file(path: str | None) -> dict[str, str]:
    """KEY=VALUE lines (as ``devchain`` writes signer.env); blank lines and # comments skipped."""
    env: dict[str, str] = {}
    if path:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read the --env-file {path}: {exc.strerror}") from None
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, _, value = line.partition("=")
                env[key.strip()] = value.strip()
    return env
