// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

import {ISignatureTransfer} from "./ISignatureTransfer.sol";

/// @title x402 Permit2 proxies, for local chains
/// @notice Written from the x402 `exact` and `upto` Permit2 specifications (the spender the
///         payer's Permit2 signature names; the witness binds the destination, the earliest
///         time and, for `upto`, the one facilitator that may choose the amount). Deployed
///         with the Permit2 address as an immutable, then their runtime code is placed at the
///         canonical proxy addresses with `anvil_setCode`, so official clients' payloads
///         verify and settle unchanged. Not here: `settleWithPermit` (EIP-2612 sponsoring).
abstract contract Permit2ProxyBase {
    ISignatureTransfer public immutable PERMIT2;

    event Settled();

    error InvalidAmount();
    error InvalidOwner();
    error InvalidDestination();
    error PaymentTooEarly();

    constructor(address permit2) {
        PERMIT2 = ISignatureTransfer(permit2);
    }

    function _settle(
        ISignatureTransfer.PermitTransferFrom calldata permit,
        uint256 amount,
        address owner,
        address to,
        uint256 validAfter,
        bytes32 witnessHash,
        string memory witnessTypeString,
        bytes calldata signature
    ) internal {
        if (amount == 0) revert InvalidAmount();
        if (owner == address(0)) revert InvalidOwner();
        if (to == address(0)) revert InvalidDestination();
        if (block.timestamp < validAfter) revert PaymentTooEarly();
        PERMIT2.permitWitnessTransferFrom(
            permit,
            ISignatureTransfer.SignatureTransferDetails({to: to, requestedAmount: amount}),
            owner,
            witnessHash,
            witnessTypeString,
            signature
        );
        emit Settled();
    }
}

/// @notice `exact`: transfers the permitted amount to the witness's `to`; anyone may submit.
contract X402ExactPermit2Proxy is Permit2ProxyBase {
    struct Witness {
        address to;
        uint256 validAfter;
    }

    string public constant WITNESS_TYPE_STRING =
        "Witness witness)TokenPermissions(address token,uint256 amount)Witness(address to,uint256 validAfter)";
    bytes32 public constant WITNESS_TYPEHASH = keccak256("Witness(address to,uint256 validAfter)");

    constructor(address permit2) Permit2ProxyBase(permit2) {}

    function settle(
        ISignatureTransfer.PermitTransferFrom calldata permit,
        address owner,
        Witness calldata witness,
        bytes calldata signature
    ) external {
        bytes32 witnessHash = keccak256(abi.encode(WITNESS_TYPEHASH, witness.to, witness.validAfter));
        _settle(
            permit, permit.permitted.amount, owner, witness.to, witness.validAfter, witnessHash,
            WITNESS_TYPE_STRING, signature
        );
    }
}

/// @notice `upto`: transfers `amount` (at most the permitted amount) to the witness's `to`;
///         only the witness's `facilitator` may submit, since it chooses the amount.
contract X402UptoPermit2Proxy is Permit2ProxyBase {
    struct Witness {
        address to;
        address facilitator;
        uint256 validAfter;
    }

    error AmountExceedsPermitted();
    error UnauthorizedFacilitator();

    string public constant WITNESS_TYPE_STRING =
        "Witness witness)TokenPermissions(address token,uint256 amount)Witness(address to,address facilitator,uint256 validAfter)";
    bytes32 public constant WITNESS_TYPEHASH = keccak256("Witness(address to,address facilitator,uint256 validAfter)");

    constructor(address permit2) Permit2ProxyBase(permit2) {}

    function settle(
        ISignatureTransfer.PermitTransferFrom calldata permit,
        uint256 amount,
        address owner,
        Witness calldata witness,
        bytes calldata signature
    ) external {
        if (msg.sender != witness.facilitator) revert UnauthorizedFacilitator();
        if (amount > permit.permitted.amount) revert AmountExceedsPermitted();
        bytes32 witnessHash =
            keccak256(abi.encode(WITNESS_TYPEHASH, witness.to, witness.facilitator, witness.validAfter));
        _settle(permit, amount, owner, witness.to, witness.validAfter, witnessHash, WITNESS_TYPE_STRING, signature);
    }
}
