"""A seeded, in-process chain that speaks :class:`~engine.chain.rpc.ChainClient`, for fault
campaigns.

It keeps what matters to settlement without an EVM: account nonces, a mempool (replacement by
fee, nonce gaps), blocks mined on the engine's clock with a base fee, receipts and logs shaped
as the real token and batcher emit them (``Transfer``, ``AuthorizationUsed``,
``AuthorizationCanceled``, ``ItemFailed``, ``CallFailed``), and the token rules of EIP-3009 (a
nonce used once, the time window, balances, cancellation). Signatures are not checked: the
engine verified them before anything reached a chain.

And it misbehaves, from one seed: calls that fail, a send that lands but answers an error, a
send that is lost, stale receipts, transactions dropped from the mempool, base-fee spikes,
reorganisations that undo recent blocks (their transactions go back to the mempool or are
lost), and third parties who front-run an authorization, use a rival authorization with the
same nonce, cancel one, or drain a payer's balance.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import msgspec
from eth_abi.abi import decode as abi_decode
from eth_abi.abi import encode as abi_encode
from eth_account import Account

from ..chain import codec, crypto
from ..chain.codec import Log, Receipt
from ..chain.rpc import RpcError, RpcUnavailable
from ..chain.signer import decode_raw
from ..clock import Clock
from ..model import Payment

ITEM_GAS = 40_000
FAILED_ITEM_GAS = 9_000
BATCH_GAS = 30_000
# Deployed code as ``eth_getCode`` answers it: fixed, so a ledger bound to the simulated chain
# (its genesis hash and its batcher's code hash) is the same chain on every life of a seed.
BATCHER_CODE = b"\x60\x80\x60\x40" + b"x402 simulated batcher"
TOKEN_CODE = b"\x60\x80\x60\x40" + b"x402 simulated token"


class Faults(msgspec.Struct):
    """Probabilities of each misbehaviour (0: never)."""

    rpc_error: float = 0.0  # any call: no answer (RpcUnavailable)
    send_lands_then_errors: float = 0.0  # send_raw: taken, then a JSON-RPC error
    send_lost: float = 0.0  # send_raw: a hash answered, the transaction never arrives
    stale_receipt: float = 0.0  # receipts(): a mined transaction answered as unknown
    mempool_drop: float = 0.0  # per block and pending transaction: dropped
    base_fee_spike: float = 0.0  # per block: the base fee multiplies by 4
    reorg: float = 0.0  # per block: the last 1..reorg_depth_max blocks are replaced
    reorg_depth_max: int = 2
    third_party: float = 0.0  # per block: a third party acts on a known authorization

    @classmethod
    def none(cls) -> Faults:
        return cls()


class _Tx(msgspec.Struct):
    hash: str
    sender: str
    nonce: int
    max_fee: int
    tip: int
    gas: int
    to: bytes
    data: bytes
    raw: bytes


class _State(msgspec.Struct):
    nonces: dict[str, int]
    balances: dict[bytes, int]
    auth: dict[tuple[bytes, bytes], int]  # (payer, nonce) -> 1 used, 2 cancelled

    def copy(self) -> _State:
        return _State(dict(self.nonces), dict(self.balances), dict(self.auth))


class _Block(msgspec.Struct):
    number: int
    hash: str
    timestamp: int
    base_fee: int
    txs: list[_Tx]
    state_before: _State


def _topic(raw: bytes) -> str:
    return "0x" + raw.rjust(32, b"\x00").hex()


def _error_string(message: str) -> bytes:
    return codec.ERROR_STRING + abi_encode(["string"], [message])


class FakeChain:
    """One chain, one token, one batcher. Call :meth:`mine` (or run :meth:`run`) to make
    blocks; ``faults`` may be swapped at any time (``Faults.none()`` heals it)."""

    def __init__(
        self,
        seed: int,
        clock: Clock,
        *,
        chain_id: int,
        token: bytes,
        batcher: bytes,
        faults: Faults | None = None,
        base_fee: int = 1_000_000_000,
        base_fee_max: int = 200_000_000_000,
        block_time_s: float = 1.0,
    ) -> None:
        self.rng = random.Random(seed)
        self.clock = clock
        self.id = chain_id
        self.token = token
        self.batcher = batcher
        self.faults = faults or Faults()
        self.base_fee_floor = base_fee
        self.base_fee_max = base_fee_max
        self.block_time_s = block_time_s
        self.state = _State({}, {}, {})
        self.blocks: list[_Block] = []
        self.mempool: dict[tuple[str, int], _Tx] = {}
        self.receipts_by_hash: dict[str, Receipt] = {}
        self._orphaned: dict[str, Receipt] = {}  # receipts of blocks a reorg removed
        self.known: list[Payment] = []  # authorizations third parties may act on
        self.requests = 0
        self.reorgs = 0
        self.third_party_actions: list[tuple[str, Payment]] = []
        self._next_base_fee = base_fee
        self._third_party = "0x" + "7e" * 20
        self._reorg_salt = 0
        self._max_head = 0
        self._mine_genesis()

    # -- set-up -------------------------------------------------------------------------------

    def fund(self, holder: bytes, amount: int) -> None:
        self.state.balances[holder] = self.state.balances.get(holder, 0) + amount

    def register(self, payment: Payment) -> None:
        """An authorization third parties may front-run, rival, cancel or drain."""
        self.known.append(payment)

    def balance(self, holder: bytes) -> int:
        return self.state.balances.get(holder, 0)

    def used_by(self, payer: bytes, nonce: bytes) -> Receipt | None:
        """The canonical receipt of the transaction that used (payer, nonce), if any."""
        for receipt in self.receipts_by_hash.values():
            for log in receipt.logs:
                if (
                    log.topics[0] == "0x" + codec.AUTHORIZATION_USED.hex()
                    and log.topics[1] == _topic(payer)
                    and log.topics[2] == "0x" + nonce.hex()
                ):
                    return receipt
        return None

    # -- ChainClient ----------------------------------------------------------------------------

    def _call(self) -> None:
        self.requests += 1
        if self.rng.random() < self.faults.rpc_error:
            raise RpcUnavailable("sim: injected: no answer")

    async def aclose(self) -> None:
        return None

    async def chain_id(self) -> int:
        self._call()
        return self.id

    async def block_number(self) -> int:
        self._call()
        return self.blocks[-1].number

    async def block_hash(self, number: int) -> str | None:
        self._call()
        if 0 <= number < len(self.blocks):
            return self.blocks[number].hash
        return None

    async def code(self, address: bytes) -> bytes:
        self._call()
        return {self.batcher: BATCHER_CODE, self.token: TOKEN_CODE}.get(address, b"")

    async def base_fee(self) -> int:
        self._call()
        return self._next_base_fee

    async def nonce(self, address: str, block: str = "pending") -> int:
        self._call()
        address = address.lower()
        n = self.state.nonces.get(address, 0)
        if block == "pending":
            while (address, n) in self.mempool:
                n += 1
        return n

    async def eth_call_code(self, code: bytes) -> bytes:
        """Deployless calls (smart-wallet signature checks): the simulator's payers are all
        EOAs with valid signatures, so nothing asks."""
        raise RpcError(-32601, "the simulator runs no creation code")

    async def eth_call(
        self, to: bytes, data: bytes, sender: str | None = None, gas: int | None = None
    ) -> bytes:
        self._call()
        scratch = self.state.copy()
        now = int(self.clock.now())
        if to == self.batcher and data[:4] == codec.SIMULATE:
            results, used = self._settle(scratch, data, now, logs=None)
            revert = codec.SIMULATION_RESULT + abi_encode(
                ["bool[]", "bytes[]", "uint256"],
                [[r[0] for r in results], [r[1] for r in results], used],
            )
            raise RpcError(3, "execution reverted", "0x" + revert.hex())
        if to == self.batcher and data[:4] == codec.AGGREGATE3:
            calls = self._aggregate3(scratch, data, now, logs=None)
            return abi_encode(["(bool,bytes)[]"], [calls])
        if to == self.token:
            ok, out = self._token_call(scratch, data, now, logs=None)
            if not ok:
                raise RpcError(3, "execution reverted", "0x" + out.hex())
            return out
        return b""

    async def estimate_gas(self, to: bytes, data: bytes, sender: str) -> int:
        self._call()
        scratch = self.state.copy()
        now = int(self.clock.now())
        if to == self.token:
            ok, out = self._token_call(scratch, data, now, logs=None)
            if not ok:
                raise RpcError(
                    3, "execution reverted: " + codec.revert_message(out), "0x" + out.hex()
                )
            return 21_000 + codec.calldata_gas(data) + ITEM_GAS
        if to == self.batcher and data[:4] == codec.SETTLE:
            _, used = self._settle(scratch, data, now, logs=None)
            return 21_000 + codec.calldata_gas(data) + used + BATCH_GAS
        if to == self.batcher and data[:4] == codec.AGGREGATE3:
            calls = self._aggregate3(scratch, data, now, logs=None)
            return 21_000 + codec.calldata_gas(data) + ITEM_GAS * len(calls) + BATCH_GAS
        return 21_000

    async def send_raw(self, raw: bytes) -> str:
        self._call()
        tx = decode_raw(raw)
        if tx.chain_id != self.id:
            raise RpcError(-32000, "invalid chain id")
        sender = str(Account.recover_transaction(raw)).lower()
        tx_hash = "0x" + crypto.keccak256(raw).hex()
        if tx.nonce < self.state.nonces.get(sender, 0):
            raise RpcError(-32000, "nonce too low")
        pending = self.mempool.get((sender, tx.nonce))
        if pending is not None:
            if pending.hash == tx_hash:
                raise RpcError(-32000, "already known")
            if tx.max_fee_per_gas * 10 < pending.max_fee * 11 or (
                tx.max_priority_fee_per_gas * 10 < pending.tip * 11
            ):
                raise RpcError(-32000, "replacement transaction underpriced")
        if self.rng.random() < self.faults.send_lost:
            return tx_hash  # answered, never arrives
        self.mempool[(sender, tx.nonce)] = _Tx(
            tx_hash,
            sender,
            tx.nonce,
            tx.max_fee_per_gas,
            tx.max_priority_fee_per_gas,
            tx.gas,
            tx.to,
            tx.data,
            raw,
        )
        if self.rng.random() < self.faults.send_lands_then_errors:
            raise RpcError(-32000, "sim: injected: request timed out")
        return tx_hash

    async def receipts(self, tx_hashes: Sequence[str]) -> list[Receipt | None]:
        self._call()
        out: list[Receipt | None] = []
        for h in tx_hashes:
            receipt = self.receipts_by_hash.get(h)
            if receipt is not None and self.rng.random() < self.faults.stale_receipt:
                receipt = None
            elif receipt is None and h in self._orphaned and self.faults.stale_receipt:
                # a node that has not caught up with a reorganisation yet
                receipt = self._orphaned[h] if self.rng.random() < 0.5 else None
            out.append(receipt)
        return out

    async def authorization_states(
        self, token: bytes, keys: Sequence[tuple[bytes, bytes]]
    ) -> list[bool]:
        self._call()
        return [self.state.auth.get(k, 0) != 0 for k in keys]

    async def authorization_used_in(
        self, token: bytes, payer: bytes, nonce: bytes, from_block: int
    ) -> str | None:
        self._call()
        receipt = self.used_by(payer, nonce)
        return None if receipt is None else receipt.transaction_hash

    # -- mining ---------------------------------------------------------------------------------

    async def run(self) -> None:
        import trio

        while True:
            await trio.sleep(self.block_time_s)
            self.mine()

    def mine(self) -> None:
        """Make the next block (perhaps after reorganising the last few)."""
        f = self.faults
        # A reorganisation replaces at most the newest reorg_depth_max blocks the chain ever
        # had: successive ones never dig deeper than that (as on a real chain).
        deepest = len(self.blocks) - (self._max_head - f.reorg_depth_max + 1)
        if deepest >= 1 and len(self.blocks) > 2 and self.rng.random() < f.reorg:
            self._reorganise(self.rng.randint(1, min(deepest, len(self.blocks) - 1)))
        if self.rng.random() < f.base_fee_spike:
            # A new fee regime: it stays (healing the faults does not bring it back down).
            self._next_base_fee = min(self._next_base_fee * 4, self.base_fee_max)
        number = len(self.blocks)
        now = int(self.clock.now())
        before = self.state.copy()
        included: list[_Tx] = []
        receipts: list[Receipt] = []
        block_hash = (
            "0x"
            + crypto.keccak256(
                b"".join(
                    (
                        self.blocks[-1].hash.encode(),
                        number.to_bytes(8, "big"),
                        bytes([self._reorg_salt % 256]),
                    )
                )
            ).hex()
        )
        if self.known and self.rng.random() < f.third_party:
            receipts.append(self._third_party_action(number, block_hash, now))
        for sender in sorted({s for s, _ in self.mempool}):
            n = self.state.nonces.get(sender, 0)
            while (sender, n) in self.mempool and self.mempool[(sender, n)].max_fee >= (
                self._next_base_fee
            ):
                tx = self.mempool.pop((sender, n))
                receipts.append(self._execute(tx, number, block_hash, now))
                included.append(tx)
                n += 1
        for key in list(self.mempool):
            if key[1] < self.state.nonces.get(key[0], 0):
                del self.mempool[key]  # its nonce was taken by another transaction
            elif self.rng.random() < f.mempool_drop:
                del self.mempool[key]
        for receipt in receipts:
            self.receipts_by_hash[receipt.transaction_hash] = receipt
            self._orphaned.pop(receipt.transaction_hash, None)
        self.blocks.append(_Block(number, block_hash, now, self._next_base_fee, included, before))
        self._max_head = max(self._max_head, number)

    def _mine_genesis(self) -> None:
        # A fixed genesis hash (all zeros): every FakeChain is "the same chain" to a ledger
        self.blocks.append(
            _Block(0, "0x" + bytes(32).hex(), 0, self.base_fee_floor, [], self.state.copy())
        )

    def _reorganise(self, depth: int) -> None:
        """Undo the last ``depth`` blocks: state back, receipts gone, their transactions back
        to the mempool (some lost)."""
        self.reorgs += 1
        self._reorg_salt += 1
        undone = self.blocks[-depth:]
        del self.blocks[-depth:]
        self.state = undone[0].state_before.copy()
        for block in undone:
            for tx in block.txs:
                orphan = self.receipts_by_hash.pop(tx.hash, None)
                if orphan is not None:
                    self._orphaned[tx.hash] = orphan
                if self.rng.random() >= 0.3:  # 30% are lost with the old blocks
                    self.mempool[(tx.sender, tx.nonce)] = tx
        # What is left from undone blocks are third parties' receipts (they have no _Tx).
        for h in [
            h
            for h, r in self.receipts_by_hash.items()
            if int(r.block_number, 16) >= len(self.blocks)
        ]:
            del self.receipts_by_hash[h]

    def _receipt(
        self,
        tx_hash: str,
        number: int,
        block_hash: str,
        ok: bool,
        gas: int,
        price: int,
        logs: list[Log],
    ) -> Receipt:
        return Receipt(
            transaction_hash=tx_hash,
            block_number=hex(number),
            block_hash=block_hash,
            status="0x1" if ok else "0x0",
            gas_used=hex(gas),
            effective_gas_price=hex(price),
            logs=logs if ok else [],
        )

    def _execute(self, tx: _Tx, number: int, block_hash: str, now: int) -> Receipt:
        self.state.nonces[tx.sender] = tx.nonce + 1
        price = min(tx.max_fee, self._next_base_fee + tx.tip)
        scratch = self.state.copy()
        logs: list[Log] = []
        ok = True
        gas = 21_000 + codec.calldata_gas(tx.data)
        if tx.to == self.token:
            ok, _ = self._token_call(scratch, tx.data, now, logs)
            gas += ITEM_GAS
        elif tx.to == self.batcher and tx.data[:4] == codec.SETTLE:
            _, used = self._settle(scratch, tx.data, now, logs)
            gas += used + BATCH_GAS
        elif tx.to == self.batcher and tx.data[:4] == codec.AGGREGATE3:
            calls = self._aggregate3(scratch, tx.data, now, logs)
            gas += ITEM_GAS * len(calls) + BATCH_GAS
        if gas > tx.gas:
            ok, gas = False, tx.gas  # out of gas: everything reverts
        if ok:
            scratch.nonces = self.state.nonces
            self.state = scratch
        return self._receipt(tx.hash, number, block_hash, ok, gas, price, logs)

    def _third_party_action(self, number: int, block_hash: str, now: int) -> Receipt:
        """Someone else acts on a known authorization, in a transaction of their own."""
        p = self.rng.choice(self.known)
        kind = self.rng.choice(["front-run", "rival", "cancel", "drain"])
        self.third_party_actions.append((kind, p))
        nonce = self.state.nonces.get(self._third_party, 0)
        self.state.nonces[self._third_party] = nonce + 1
        tx_hash = (
            "0x"
            + crypto.keccak256(
                f"third-party {self._third_party} {nonce} {self._reorg_salt}".encode()
            ).hex()
        )
        logs: list[Log] = []
        scratch = self.state.copy()
        ok = True
        if kind == "front-run":
            ok = self._transfer(
                scratch,
                p.payer,
                p.payee,
                p.value,
                p.valid_after,
                p.valid_before,
                p.nonce,
                now,
                logs,
            )[0]
        elif kind == "rival":  # another authorization, same nonce, to someone else
            ok = self._transfer(
                scratch, p.payer, b"\x7f" * 20, 1, 0, 2**48 - 1, p.nonce, now, logs
            )[0]
        elif kind == "cancel":
            key = (p.payer, p.nonce)
            ok = scratch.auth.get(key, 0) == 0
            if ok:
                scratch.auth[key] = 2
                logs.append(
                    Log(
                        "0x" + self.token.hex(),
                        [
                            "0x" + codec.AUTHORIZATION_CANCELED.hex(),
                            _topic(p.payer),
                            "0x" + p.nonce.hex(),
                        ],
                        "0x",
                    )
                )
        else:  # drain: the payer moves the whole balance away
            amount = scratch.balances.get(p.payer, 0)
            scratch.balances[p.payer] = 0
            scratch.balances[b"\x7f" * 20] = scratch.balances.get(b"\x7f" * 20, 0) + amount
            logs.append(self._transfer_log(p.payer, b"\x7f" * 20, amount))
        if ok:
            self.state = scratch
        return self._receipt(tx_hash, number, block_hash, ok, 60_000, self._next_base_fee, logs)

    # -- token and batcher semantics --------------------------------------------------------------

    def _transfer_log(self, frm: bytes, to: bytes, value: int) -> Log:
        return Log(
            "0x" + self.token.hex(),
            ["0x" + codec.TRANSFER.hex(), _topic(frm), _topic(to)],
            "0x" + value.to_bytes(32, "big").hex(),
        )

    def _transfer(
        self,
        state: _State,
        payer: bytes,
        payee: bytes,
        value: int,
        valid_after: int,
        valid_before: int,
        nonce: bytes,
        now: int,
        logs: list[Log] | None,
    ) -> tuple[bool, bytes]:
        """EIP-3009 transferWithAuthorization (signature taken as valid)."""
        if now <= valid_after:
            return False, _error_string("FiatTokenV2: authorization is not yet valid")
        if now >= valid_before:
            return False, _error_string("FiatTokenV2: authorization is expired")
        if state.auth.get((payer, nonce), 0):
            return False, _error_string("FiatTokenV2: authorization is used or canceled")
        if state.balances.get(payer, 0) < value:
            return False, _error_string("ERC20: transfer amount exceeds balance")
        state.auth[(payer, nonce)] = 1
        state.balances[payer] -= value
        state.balances[payee] = state.balances.get(payee, 0) + value
        if logs is not None:
            logs.append(
                Log(
                    "0x" + self.token.hex(),
                    ["0x" + codec.AUTHORIZATION_USED.hex(), _topic(payer), "0x" + nonce.hex()],
                    "0x",
                )
            )
            logs.append(self._transfer_log(payer, payee, value))
        return True, b""

    def _token_call(
        self, state: _State, data: bytes, now: int, logs: list[Log] | None
    ) -> tuple[bool, bytes]:
        selector = data[:4]
        if selector == codec.BALANCE_OF:
            return True, state.balances.get(data[16:36], 0).to_bytes(32, "big")
        if selector == codec.AUTHORIZATION_STATE:
            used = state.auth.get((data[16:36], data[36:68]), 0) != 0
            return True, (1 if used else 0).to_bytes(32, "big")
        if selector == codec.TRANSFER_WITH_AUTHORIZATION:
            frm, to, value, after, before, nonce, *_ = abi_decode(
                codec.TRANSFER_WITH_AUTHORIZATION_TYPES, data[4:]
            )
            return self._transfer(
                state,
                bytes.fromhex(frm[2:]),
                bytes.fromhex(to[2:]),
                value,
                after,
                before,
                nonce,
                now,
                logs,
            )
        return False, b""

    def _settle(
        self, state: _State, data: bytes, now: int, logs: list[Log] | None
    ) -> tuple[list[tuple[bool, bytes]], int]:
        """The batcher's settle/simulate: every packed item, failures logged, never reverts."""
        _, packed = abi_decode(["address", "bytes"], data[4:])
        results: list[tuple[bool, bytes]] = []
        used = 0
        for index in range(len(packed) // codec.ITEM_SIZE):
            item = packed[index * codec.ITEM_SIZE : (index + 1) * codec.ITEM_SIZE]
            ok, revert = self._transfer(
                state,
                item[0:20],
                item[20:40],
                int.from_bytes(item[40:56], "big"),
                int.from_bytes(item[56:62], "big"),
                int.from_bytes(item[62:68], "big"),
                item[68:100],
                now,
                logs,
            )
            used += ITEM_GAS if ok else FAILED_ITEM_GAS
            results.append((ok, revert))
            if not ok and logs is not None:
                logs.append(
                    Log(
                        "0x" + self.batcher.hex(),
                        ["0x" + codec.ITEM_FAILED.hex()],
                        "0x" + abi_encode(["uint256", "bytes"], [index, revert]).hex(),
                    )
                )
        return results, used

    def _aggregate3(
        self, state: _State, data: bytes, now: int, logs: list[Log] | None
    ) -> list[tuple[bool, bytes]]:
        (calls,) = abi_decode(["(address,bool,bytes)[]"], data[4:])
        results: list[tuple[bool, bytes]] = []
        for index, (target, _allow, call) in enumerate(calls):
            if bytes.fromhex(target[2:]) != self.token:
                results.append((True, b""))  # no code there
                continue
            ok, out = self._token_call(state, bytes(call), now, logs)
            results.append((ok, out))
            if not ok and logs is not None:
                logs.append(
                    Log(
                        "0x" + self.batcher.hex(),
                        ["0x" + codec.CALL_FAILED.hex()],
                        "0x" + abi_encode(["uint256", "bytes"], [index, out]).hex(),
                    )
                )
        return results
