// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

/// @title CallBatch
/// @notice Settlement items that are whole calls (a Permit2 proxy's `settle`): each is run in
///         turn; a failing item never reverts the batch, it is reported with an ItemFailed log.
///         `_simulateCalls` runs the same calls and always reverts with SimulationResult.
abstract contract CallBatch {
    struct Call {
        address target;
        bytes data;
    }

    /// @notice Item `index` of a batch failed; `reason` is its revert data.
    event ItemFailed(uint256 index, bytes reason);

    /// @notice Always raised by the simulations: per item, whether it succeeded and its revert
    ///         data, and the gas the item calls used.
    error SimulationResult(bool[] ok, bytes[] reasons, uint256 gasUsed);

    function _settleCalls(Call[] calldata calls) internal {
        for (uint256 i; i < calls.length; ) {
            (bool ok, bytes memory reason) = _call(calls[i]);
            if (!ok) emit ItemFailed(i, reason);
            unchecked {
                ++i;
            }
        }
    }

    function _simulateCalls(Call[] calldata calls) internal {
        uint256 gasStart = gasleft();
        uint256 n = calls.length;
        bytes[] memory reasons = new bytes[](n);
        bool[] memory succeeded = new bool[](n);
        for (uint256 i; i < n; ) {
            (succeeded[i], reasons[i]) = _call(calls[i]);
            unchecked {
                ++i;
            }
        }
        revert SimulationResult(succeeded, reasons, gasStart - gasleft());
    }

    function _call(Call calldata c) private returns (bool ok, bytes memory reason) {
        if (c.target.code.length == 0) return (false, "");
        uint256 g = gasleft();
        (ok, reason) = c.target.call(c.data);
        // The callee burnt (almost) all forwarded gas: the transaction is short of gas. Revert
        // rather than fail items only for lack of gas.
        if (!ok && gasleft() <= g / 63) revert();
        if (ok) reason = "";
    }
}
