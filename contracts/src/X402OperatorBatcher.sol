// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

import {CallBatch} from "./CallBatch.sol";

/// @title X402OperatorBatcher
/// @notice A facilitator's own batcher for `upto` payments: the payer's signature names the
///         facilitator (this contract) as the only one allowed to choose the amount, so only the
///         facilitator's operators (its signer accounts) may run batches through it.
contract X402OperatorBatcher is CallBatch {
    address public owner;
    mapping(address => bool) public operators;

    error NotOperator();
    error NotOwner();

    event OperatorSet(address indexed operator, bool allowed);

    constructor(address[] memory initialOperators) {
        owner = msg.sender;
        for (uint256 i; i < initialOperators.length; ++i) {
            operators[initialOperators[i]] = true;
            emit OperatorSet(initialOperators[i], true);
        }
    }

    function setOperator(address operator, bool allowed) external {
        if (msg.sender != owner) revert NotOwner();
        operators[operator] = allowed;
        emit OperatorSet(operator, allowed);
    }

    function settleCalls(Call[] calldata calls) external {
        if (!operators[msg.sender]) revert NotOperator();
        _settleCalls(calls);
    }

    function simulateCalls(Call[] calldata calls) external {
        if (!operators[msg.sender]) revert NotOperator();
        _simulateCalls(calls);
    }
}
