// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

/// @title SignatureChecks
/// @notice A deployless batch check of signatures, for `eth_call` without a `to`: the
///         constructor runs the checks and returns `bool[]` instead of code, so nothing needs to
///         be deployed on the chain. Per item (signer, hash, signature):
///         - an ERC-6492 wrapped signature (ends with the 6492 magic suffix) of a signer without
///           code first runs its factory call (deploying the wallet inside this eth_call only),
///           then checks the inner signature;
///         - a signer with code is asked through EIP-1271 `isValidSignature` (no ECDSA fallback);
///         - any other signer needs a 65-byte r || s || v ECDSA signature, low s.
///         Factories are not vetted here: the caller sends only allowlisted ones.
contract SignatureChecks {
    bytes32 private constant ERC6492_SUFFIX = 0x6492649264926492649264926492649264926492649264926492649264926492;
    uint256 private constant HALF_CURVE_ORDER =
        0x7fffffffffffffffffffffffffffffff5d576e7357a4501ddfe92f46681b20a0;

    constructor(address[] memory signers, bytes32[] memory hashes, bytes[] memory signatures) {
        uint256 n = signers.length;
        require(hashes.length == n && signatures.length == n, "SignatureChecks: lengths");
        bool[] memory valid = new bool[](n);
        for (uint256 i; i < n; ++i) {
            valid[i] = _check(signers[i], hashes[i], signatures[i]);
        }
        bytes memory out = abi.encode(valid);
        assembly ("memory-safe") {
            return(add(out, 0x20), mload(out))
        }
    }

    function _check(address signer, bytes32 hash, bytes memory signature) private returns (bool) {
        if (_is6492(signature)) {
            (address factory, bytes memory factoryCall, bytes memory inner) =
                abi.decode(_strip(signature), (address, bytes, bytes));
            if (signer.code.length == 0) {
                (bool deployed, ) = factory.call(factoryCall);
                if (!deployed || signer.code.length == 0) return false;
            }
            signature = inner;
        }
        if (signer.code.length > 0) {
            (bool ok, bytes memory ret) =
                signer.staticcall(abi.encodeWithSelector(0x1626ba7e, hash, signature));
            return ok && ret.length >= 32 && abi.decode(ret, (bytes4)) == bytes4(0x1626ba7e);
        }
        if (signature.length != 65) return false;
        bytes32 r;
        bytes32 s;
        uint8 v;
        assembly ("memory-safe") {
            r := mload(add(signature, 0x20))
            s := mload(add(signature, 0x40))
            v := byte(0, mload(add(signature, 0x60)))
        }
        if (uint256(s) > HALF_CURVE_ORDER || (v != 27 && v != 28)) return false;
        address recovered = ecrecover(hash, v, r, s);
        return recovered != address(0) && recovered == signer;
    }

    function _is6492(bytes memory signature) private pure returns (bool yes) {
        if (signature.length < 32) return false;
        bytes32 tail;
        assembly ("memory-safe") {
            tail := mload(add(signature, mload(signature)))
        }
        return tail == ERC6492_SUFFIX;
    }

    /// @dev The signature without its 32-byte suffix (a copy).
    function _strip(bytes memory signature) private pure returns (bytes memory out) {
        uint256 n = signature.length - 32;
        out = new bytes(n);
        for (uint256 i; i < n; ++i) out[i] = signature[i];
    }
}
