// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

/// @title TestWallet
/// @notice A minimal smart-contract wallet for tests: EIP-1271 `isValidSignature` accepts a
///         65-byte r || s || v ECDSA signature by its `owner` over the given hash, nothing else.
///         It holds tokens like any address and needs no other function to pay by EIP-3009.
contract TestWallet {
    bytes4 private constant MAGIC = 0x1626ba7e;
    uint256 private constant HALF_CURVE_ORDER =
        0x7fffffffffffffffffffffffffffffff5d576e7357a4501ddfe92f46681b20a0;

    address public immutable owner;

    constructor(address owner_) {
        owner = owner_;
    }

    function isValidSignature(bytes32 hash, bytes calldata signature) external view returns (bytes4) {
        if (signature.length != 65) return 0xffffffff;
        bytes32 r = bytes32(signature[0:32]);
        bytes32 s = bytes32(signature[32:64]);
        uint8 v = uint8(signature[64]);
        if (uint256(s) > HALF_CURVE_ORDER || (v != 27 && v != 28)) return 0xffffffff;
        address recovered = ecrecover(hash, v, r, s);
        return recovered != address(0) && recovered == owner ? MAGIC : bytes4(0xffffffff);
    }
}
