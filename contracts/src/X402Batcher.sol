// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

import {CallBatch} from "./CallBatch.sol";

/// @title X402Batcher
/// @notice Stateless batch executor for x402 EIP-3009 settlements.
///         - `aggregate3`: Multicall3-compatible generic batching (plus a CallFailed log per
///           tolerated failure).
///         - `settle`: compact batch of transferWithAuthorization calls on one token; a failing
///           item never reverts the batch, it is reported with an ItemFailed log instead.
///         - `simulate`: the same calls as `settle`, always reverting with SimulationResult
///           carrying every item's revert data (for eth_call only).
///         - `settleSigned` / `simulateSigned`: smart-wallet signatures of any length.
///         - `settleCalls` / `simulateCalls`: items that are whole calls (Permit2 `exact`
///           proxy settlements), reported the same way.
/// @dev No owner, no access control, no storage.
///
///      Compact item layout (165 bytes, tightly packed, big-endian):
///        offset   0: from        (address, 20)
///        offset  20: to          (address, 20)
///        offset  40: value       (uint128, 16)
///        offset  56: validAfter  (uint48,   6)
///        offset  62: validBefore (uint48,   6)
///        offset  68: nonce       (bytes32, 32)
///        offset 100: r           (bytes32, 32)
///        offset 132: s           (bytes32, 32)
///        offset 164: v           (uint8,    1)
contract X402Batcher is CallBatch {
    struct Call3 {
        address target;
        bool allowFailure;
        bytes callData;
    }

    struct Result {
        bool success;
        bytes returnData;
    }

    /// @notice A call of `aggregate3` with allowFailure == true failed; `reason` is its revert data.
    event CallFailed(uint256 index, bytes reason);

    // ItemFailed(index, reason) and SimulationResult(ok, reasons, gasUsed) come from CallBatch:
    // an item's revert data is empty when the token has no code or the call ran out of gas
    // without data; `gasUsed` sizes the real transaction without eth_estimateGas.

    uint256 private constant ITEM_SIZE = 165;

    /// keccak256("ItemFailed(uint256,bytes)") (a literal so that inline assembly can use it).
    bytes32 private constant ITEM_FAILED_TOPIC = 0xed3cd553e641c2aa7a6248d851a8795925cfbe44b5b14ff80fbf652acc2d4fd0;

    /// bytes4(keccak256("transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)")),
    /// right-aligned (a uint256, so that `shl(224, ...)` in assembly puts it in the leading 4 bytes).
    uint256 private constant TRANSFER_WITH_AUTHORIZATION_SELECTOR = 0xe3ee160e;

    /// Size of the ABI-encoded transferWithAuthorization(v, r, s) call: selector + 9 words.
    uint256 private constant PAYLOAD_SIZE = 0x124;

    // ------------------------------------------------------------------ Multicall3

    /// @notice Multicall3 `aggregate3`: performs every call; reverts with
    ///         "Multicall3: call failed" when a call with allowFailure == false fails.
    function aggregate3(Call3[] calldata calls) external payable returns (Result[] memory returnData) {
        uint256 n = calls.length;
        returnData = new Result[](n);
        for (uint256 i; i < n; ) {
            Call3 calldata c = calls[i];
            (bool ok, bytes memory ret) = c.target.call(c.callData);
            if (!ok) {
                require(c.allowFailure, "Multicall3: call failed");
                emit CallFailed(i, ret);
            }
            Result memory res = returnData[i];
            res.success = ok;
            res.returnData = ret;
            unchecked {
                ++i;
            }
        }
    }

    // ------------------------------------------------------------------ compact settlement

    /// @notice Executes `token.transferWithAuthorization(...)` for every 165-byte item.
    ///         Never reverts because an item failed; emits ItemFailed(index, revertData) instead.
    function settle(address token, bytes calldata items) external {
        require(items.length % ITEM_SIZE == 0, "X402Batcher: bad items length");
        assembly ("memory-safe") {
            // Scratch layout at the free memory pointer (never allocated, reused per item):
            //   buf          : call payload (PAYLOAD_SIZE bytes)
            //   buf + 0x140  : ItemFailed event data (index, 0x40, length, reason...)
            let buf := mload(0x40)
            mstore(buf, shl(224, TRANSFER_WITH_AUTHORIZATION_SELECTOR))
            // A call to an address without code "succeeds": treat every item as failed instead.
            let hasCode := gt(extcodesize(token), 0)
            let p := items.offset
            let end := add(p, items.length)
            for { let i := 0 } lt(p, end) { p := add(p, ITEM_SIZE) i := add(i, 1) } {
                let ok := 0
                if hasCode {
                    mstore(add(buf, 0x04), shr(96, calldataload(p)))             // from
                    mstore(add(buf, 0x24), shr(96, calldataload(add(p, 20))))    // to
                    mstore(add(buf, 0x44), shr(128, calldataload(add(p, 40))))   // value
                    mstore(add(buf, 0x64), shr(208, calldataload(add(p, 56))))   // validAfter
                    mstore(add(buf, 0x84), shr(208, calldataload(add(p, 62))))   // validBefore
                    mstore(add(buf, 0xa4), calldataload(add(p, 68)))             // nonce
                    mstore(add(buf, 0xc4), shr(248, calldataload(add(p, 164))))  // v
                    mstore(add(buf, 0xe4), calldataload(add(p, 100)))            // r
                    mstore(add(buf, 0x104), calldataload(add(p, 132)))           // s
                    let g := gas()
                    ok := call(g, token, 0, buf, PAYLOAD_SIZE, 0, 0)
                    // The callee burnt (almost) all forwarded gas: the transaction itself is short
                    // of gas. Revert so that gas estimation never settles on a limit at which
                    // items fail only for lack of gas.
                    if iszero(or(ok, gt(gas(), div(g, 63)))) { revert(0, 0) }
                }
                if iszero(ok) {
                    let ev := add(buf, 0x140)
                    let len := returndatasize()
                    mstore(ev, i)
                    mstore(add(ev, 0x20), 0x40)
                    mstore(add(ev, 0x40), len)
                    returndatacopy(add(ev, 0x60), 0, len)
                    mstore(add(add(ev, 0x60), len), 0) // zero the padding word
                    log1(ev, add(0x60, and(add(len, 31), not(31))), ITEM_FAILED_TOPIC)
                }
            }
        }
    }

    /// @notice Runs exactly the calls `settle` would, then ALWAYS reverts with
    ///         SimulationResult(ok, reasons): ok[i] tells whether item i succeeded and
    ///         reasons[i] is its revert data (empty on success, possibly empty on failure).
    ///         Meant for eth_call only; it can never change state.
    function simulate(address token, bytes calldata items) external {
        uint256 gasStart = gasleft();
        require(items.length % ITEM_SIZE == 0, "X402Batcher: bad items length");
        uint256 n = items.length / ITEM_SIZE;
        bytes[] memory reasons = new bytes[](n);
        bool[] memory succeeded = new bool[](n);
        bytes memory buf = new bytes(PAYLOAD_SIZE);
        bool hasCode = token.code.length > 0;
        for (uint256 i; i < n; ) {
            bool ok = hasCode && _callItem(token, items, i, buf);
            succeeded[i] = ok;
            if (!ok) {
                bytes memory reason = new bytes(_returnDataSize());
                assembly ("memory-safe") {
                    returndatacopy(add(reason, 0x20), 0, mload(reason))
                }
                reasons[i] = reason;
            }
            unchecked {
                ++i;
            }
        }
        revert SimulationResult(succeeded, reasons, gasStart - gasleft());
    }

    /// @dev Item `i` of `items` as a transferWithAuthorization(v, r, s) call, exactly as
    ///      `settle` builds it; the return data stays available to the caller.
    function _callItem(address token, bytes calldata items, uint256 i, bytes memory buf)
        private
        returns (bool ok)
    {
        assembly ("memory-safe") {
            let p := add(items.offset, mul(i, ITEM_SIZE))
            let b := add(buf, 0x20)
            mstore(b, shl(224, TRANSFER_WITH_AUTHORIZATION_SELECTOR))
            mstore(add(b, 0x04), shr(96, calldataload(p)))
            mstore(add(b, 0x24), shr(96, calldataload(add(p, 20))))
            mstore(add(b, 0x44), shr(128, calldataload(add(p, 40))))
            mstore(add(b, 0x64), shr(208, calldataload(add(p, 56))))
            mstore(add(b, 0x84), shr(208, calldataload(add(p, 62))))
            mstore(add(b, 0xa4), calldataload(add(p, 68)))
            mstore(add(b, 0xc4), shr(248, calldataload(add(p, 164))))
            mstore(add(b, 0xe4), calldataload(add(p, 100)))
            mstore(add(b, 0x104), calldataload(add(p, 132)))
            let g := gas()
            ok := call(g, token, 0, b, PAYLOAD_SIZE, 0, 0)
            if iszero(or(ok, gt(gas(), div(g, 63)))) { revert(0, 0) }
        }
    }

    // ------------------------------------------------------------------ signed items

    /// @notice An authorization with a signature of any length (a smart wallet's EIP-1271
    ///         signature), and for a wallet not deployed yet (ERC-6492) its factory call.
    struct SignedItem {
        address from;
        address to;
        uint256 value;
        uint256 validAfter;
        uint256 validBefore;
        bytes32 nonce;
        bytes signature;
        address factory; // address(0): none
        bytes factoryCall;
    }

    /// @notice Like `settle` for signed items: per item, if `factory` is set and `from` has no
    ///         code yet, calls the factory first (once: a later item of the same wallet finds
    ///         its code); then the token's bytes-signature transferWithAuthorization. A failed
    ///         item emits ItemFailed(index, reason) and never reverts the batch.
    function settleSigned(address token, SignedItem[] calldata items) external {
        bool hasCode = token.code.length > 0;
        for (uint256 i; i < items.length; ) {
            (bool ok, bytes memory reason) = hasCode ? _callSigned(token, items[i]) : (false, bytes(""));
            if (!ok) emit ItemFailed(i, reason);
            unchecked {
                ++i;
            }
        }
    }

    /// @notice Runs exactly the calls `settleSigned` would, then ALWAYS reverts with
    ///         SimulationResult (as `simulate`). For eth_call only.
    function simulateSigned(address token, SignedItem[] calldata items) external {
        uint256 gasStart = gasleft();
        uint256 n = items.length;
        bytes[] memory reasons = new bytes[](n);
        bool[] memory succeeded = new bool[](n);
        bool hasCode = token.code.length > 0;
        for (uint256 i; i < n; ) {
            (bool ok, bytes memory reason) = hasCode ? _callSigned(token, items[i]) : (false, bytes(""));
            succeeded[i] = ok;
            reasons[i] = reason;
            unchecked {
                ++i;
            }
        }
        revert SimulationResult(succeeded, reasons, gasStart - gasleft());
    }

    function _callSigned(address token, SignedItem calldata item) private returns (bool ok, bytes memory reason) {
        if (item.factory != address(0) && item.from.code.length == 0) {
            // Deployment failures show as the transfer's failure below (no code, no EIP-1271).
            (bool deployed, ) = item.factory.call(item.factoryCall);
            deployed;
        }
        uint256 g = gasleft();
        (ok, reason) = token.call(
            abi.encodeWithSignature(
                "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)",
                item.from,
                item.to,
                item.value,
                item.validAfter,
                item.validBefore,
                item.nonce,
                item.signature
            )
        );
        // The callee burnt (almost) all forwarded gas: the transaction is short of gas (as in
        // `settle`): revert rather than fail items only for lack of gas.
        if (!ok && gasleft() <= g / 63) revert();
        if (ok) reason = "";
    }

    // ------------------------------------------------------------------ call items

    /// @notice Runs every call (a Permit2 proxy's `settle`); never reverts because one failed.
    function settleCalls(Call[] calldata calls) external {
        _settleCalls(calls);
    }

    /// @notice Runs exactly the calls `settleCalls` would, then ALWAYS reverts with
    ///         SimulationResult. For eth_call only.
    function simulateCalls(Call[] calldata calls) external {
        _simulateCalls(calls);
    }

    function _returnDataSize() private pure returns (uint256 size) {
        assembly ("memory-safe") {
            size := returndatasize()
        }
    }
}
