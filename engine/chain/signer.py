"""The facilitator's gas-paying accounts: local account-nonce allocation and signing.

Nonces are read from the node once (``pending``) at start and then allocated locally, one per
batch, so there is no ``eth_getTransactionCount`` per transaction and no race between batches.
"""

from __future__ import annotations

import rlp  # type: ignore[import-untyped]
from eth_account import Account
from eth_utils.address import to_checksum_address

from ..config import SignerKey
from ..model import hex_addr
from ..rules.fees import Fees
from . import crypto


class SignedTx:
    __slots__ = ("nonce", "raw", "tx_hash")

    def __init__(self, raw: bytes, tx_hash: str, nonce: int) -> None:
        self.raw = raw
        self.tx_hash = tx_hash
        self.nonce = nonce


class Signer:
    def __init__(self, key: SignerKey, chain_id: int) -> None:
        self._key = key
        self.chain_id = chain_id
        self.address = hex_addr(crypto.private_key_address(key.secret))
        self.next_nonce: int | None = None
        # shared ledger: the epoch of this instance's lease on the account (fencing token)
        self.lease_epoch: int | None = None

    def __repr__(self) -> str:
        return f"Signer({self.address}, next_nonce={self.next_nonce})"

    def sign(
        self,
        *,
        to: bytes,
        data: bytes,
        gas: int,
        max_fee_per_gas: int,
        max_priority_fee_per_gas: int,
        nonce: int | None = None,
    ) -> SignedTx:
        """Sign with the next local nonce and advance it, or with ``nonce`` (a replacement of
        a transaction already sent under it; the local counter stays)."""
        replacing = nonce is not None
        if nonce is None:
            assert self.next_nonce is not None, "nonce not initialised"
            nonce = self.next_nonce
        tx = {
            "type": 2,
            "chainId": self.chain_id,
            "nonce": nonce,
            "to": to_checksum_address("0x" + to.hex()),
            "value": 0,
            "data": "0x" + data.hex(),
            "gas": gas,
            "maxFeePerGas": max_fee_per_gas,
            "maxPriorityFeePerGas": max_priority_fee_per_gas,
            "accessList": [],
        }
        signed = Account.sign_transaction(tx, self._key.secret)
        if not replacing:
            self.next_nonce = nonce + 1
        return SignedTx(bytes(signed.raw_transaction), "0x" + bytes(signed.hash).hex(), nonce)

    def replace(self, raw: bytes, fees: Fees) -> SignedTx:
        """The transaction ``raw`` (an EIP-1559 one this signer made) again, same nonce and
        call, with ``fees``."""
        tx = decode_raw(raw)
        return self.sign(
            to=tx.to,
            data=tx.data,
            gas=tx.gas,
            max_fee_per_gas=fees.max_fee_per_gas,
            max_priority_fee_per_gas=fees.max_priority_fee_per_gas,
            nonce=tx.nonce,
        )


class RawTx:
    """The fields of a signed EIP-1559 (type 2) transaction."""

    __slots__ = (
        "chain_id",
        "data",
        "gas",
        "max_fee_per_gas",
        "max_priority_fee_per_gas",
        "nonce",
        "to",
        "value",
    )

    def __init__(self, fields: list[bytes]) -> None:
        as_int = [int.from_bytes(f, "big") for f in fields[:5]]
        self.chain_id, self.nonce, self.max_priority_fee_per_gas, self.max_fee_per_gas = as_int[:4]
        self.gas = as_int[4]
        self.to: bytes = fields[5]
        self.value = int.from_bytes(fields[6], "big")
        self.data: bytes = fields[7]

    @property
    def fees(self) -> Fees:
        return Fees(self.max_fee_per_gas, self.max_priority_fee_per_gas)


def decode_raw(raw: bytes) -> RawTx:
    """Decode a signed type-2 transaction (ValueError if it is not one)."""
    if not raw or raw[0] != 2:
        raise ValueError("not an EIP-1559 (type 2) transaction")
    fields = rlp.decode(raw[1:])
    if not isinstance(fields, list) or len(fields) != 12:
        raise ValueError("malformed EIP-1559 transaction")
    return RawTx(fields)


class SignerPool:
    """Round-robin over a chain's signers."""

    def __init__(self, signers: list[Signer]) -> None:
        assert signers
        self.signers = signers
        self._next = 0

    def next(self) -> Signer:
        signer = self.signers[self._next % len(self.signers)]
        self._next += 1
        return signer

    def add(self, signer: Signer) -> None:
        """A signer taken over from another instance (shared ledger), nonce already read."""
        assert signer.next_nonce is not None and self.by_address(signer.address) is None
        self.signers.append(signer)

    def by_address(self, address: str) -> Signer | None:
        for s in self.signers:
            if s.address == address.lower():
                return s
        return None
