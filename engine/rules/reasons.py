"""x402 error reason codes used by the engine (the strings the SDKs and the spec use)."""

from __future__ import annotations

from typing import Final

INSUFFICIENT_FUNDS: Final = "insufficient_funds"
VALID_AFTER: Final = "invalid_exact_evm_payload_authorization_valid_after"
VALID_BEFORE: Final = "invalid_exact_evm_payload_authorization_valid_before"
VALUE_MISMATCH: Final = "invalid_exact_evm_payload_authorization_value_mismatch"
SIGNATURE: Final = "invalid_exact_evm_payload_signature"
RECIPIENT_MISMATCH: Final = "invalid_exact_evm_payload_recipient_mismatch"
NONCE_USED: Final = "invalid_exact_evm_nonce_already_used"
INVALID_NETWORK: Final = "invalid_network"
INVALID_PAYLOAD: Final = "invalid_payload"
INVALID_REQUIREMENTS: Final = "invalid_payment_requirements"
INVALID_SCHEME: Final = "invalid_scheme"
UNSUPPORTED_SCHEME: Final = "unsupported_scheme"
INVALID_VERSION: Final = "invalid_x402_version"
INVALID_TRANSACTION_STATE: Final = "invalid_transaction_state"
UNEXPECTED_VERIFY: Final = "unexpected_verify_error"
UNEXPECTED_SETTLE: Final = "unexpected_settle_error"
SETTLEMENT_PENDING: Final = "settlement_pending"
# Internal, never answered: a 65-byte signature that does not recover to authorization.from;
# only the chain can tell whether the payer is a contract that accepts it (EIP-1271).
CONTRACT_SIGNATURE: Final = "contract_signature_to_check"
# The reference exact-EVM facilitator's code: the authorization was used, but the receipt holds
# no token Transfer(from, to, value) matching it (a fee-on-transfer or non-standard token).
TRANSFER_EVENT_MISMATCH: Final = "invalid_exact_evm_transfer_event_mismatch"
# The reference facilitator's code: an ERC-6492 signature whose factory is not allowlisted.
FACTORY_NOT_ALLOWED: Final = "eip6492_factory_not_allowed"
# A /settle of a payment that an earlier /settle already answered with success (one payment,
# one purchase): the x402 spec's code for a settlement already seen (exact SVM and XRPL).
DUPLICATE_SETTLEMENT: Final = "duplicate_settlement"
# The reference exact-EVM facilitator's code for a token address without code.
ASSET_NOT_DEPLOYED: Final = "asset_not_deployed_contract"
# The payment-identifier extension: the id is bound to another payment. The extension defines
# no reason string (its resource-server answer is HTTP 409); facilitator answers are 200.
PAYMENT_ID_CONFLICT: Final = "payment_identifier_conflict"

# Revert strings of a FiatToken-style EIP-3009 token, mapped to x402 reasons. Matching is by
# substring so that other tokens' close variants ("... is expired") map too.
_REVERT_REASONS: Final = (
    ("authorization is used or canceled", NONCE_USED),
    ("authorization is used", NONCE_USED),
    ("authorization is expired", VALID_BEFORE),
    ("authorization is not yet valid", VALID_AFTER),
    ("invalid signature", SIGNATURE),
    ("transfer amount exceeds balance", INSUFFICIENT_FUNDS),
    ("exceeds balance", INSUFFICIENT_FUNDS),
    ("insufficient balance", INSUFFICIENT_FUNDS),
)


def reason_for_revert(message: str) -> str:
    """Map a token's revert message to an x402 reason code."""
    lowered = message.lower()
    for needle, reason in _REVERT_REASONS:
        if needle in lowered:
            return reason
    return UNEXPECTED_SETTLE


# Permit2 payments (the reference facilitator's codes for the exact and upto schemes).
PERMIT2_SPENDER: Final = "invalid_permit2_spender"
PERMIT2_RECIPIENT: Final = "invalid_permit2_recipient_mismatch"
PERMIT2_DEADLINE: Final = "permit2_deadline_expired"
PERMIT2_NOT_YET_VALID: Final = "permit2_not_yet_valid"
PERMIT2_AMOUNT: Final = "permit2_amount_mismatch"
PERMIT2_TOKEN: Final = "permit2_token_mismatch"
PERMIT2_SIGNATURE: Final = "invalid_permit2_signature"
PERMIT2_ALLOWANCE: Final = "permit2_allowance_required"
PERMIT2_NONCE_USED: Final = "permit2_invalid_nonce"
UPTO_FACILITATOR: Final = "upto_facilitator_mismatch"
UPTO_EXCEEDS: Final = "invalid_upto_evm_payload_settlement_exceeds_amount"
