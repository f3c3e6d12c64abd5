// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

/// @title TestToken
/// @notice A USDC-like ERC-20 test token with full EIP-3009 support
///         (transferWithAuthorization, receiveWithAuthorization, cancelAuthorization).
/// @dev Revert strings deliberately match FiatTokenV2 (USDC) so that off-chain code
///      decoding Error(string) revert data behaves the same against both.
///      Only the owner (the deployer) can mint. Not for production use.
contract TestToken {
    // ------------------------------------------------------------------ constants

    /// keccak256("TransferWithAuthorization(address from,address to,uint256 value,uint256 validAfter,uint256 validBefore,bytes32 nonce)")
    bytes32 public constant TRANSFER_WITH_AUTHORIZATION_TYPEHASH =
        keccak256(
            "TransferWithAuthorization(address from,address to,uint256 value,uint256 validAfter,uint256 validBefore,bytes32 nonce)"
        );

    /// keccak256("ReceiveWithAuthorization(address from,address to,uint256 value,uint256 validAfter,uint256 validBefore,bytes32 nonce)")
    bytes32 public constant RECEIVE_WITH_AUTHORIZATION_TYPEHASH =
        keccak256(
            "ReceiveWithAuthorization(address from,address to,uint256 value,uint256 validAfter,uint256 validBefore,bytes32 nonce)"
        );

    /// keccak256("CancelAuthorization(address authorizer,bytes32 nonce)")
    bytes32 public constant CANCEL_AUTHORIZATION_TYPEHASH =
        keccak256("CancelAuthorization(address authorizer,bytes32 nonce)");

    bytes32 private constant EIP712_DOMAIN_TYPEHASH =
        keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)");

    /// secp256k1n / 2: signatures with a larger s are malleable and rejected.
    uint256 private constant HALF_CURVE_ORDER =
        0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0;

    // ------------------------------------------------------------------ storage

    string public name;
    string public symbol;
    uint8 public immutable decimals;
    address public immutable owner;

    /// EIP-712 domain separator, fixed at deployment.
    bytes32 public immutable DOMAIN_SEPARATOR;

    uint256 public totalSupply;
    mapping(address => uint256) private _balances;
    mapping(address => mapping(address => uint256)) private _allowances;
    mapping(address => mapping(bytes32 => bool)) private _authorizationStates;

    // ------------------------------------------------------------------ events

    event Transfer(address indexed from, address indexed to, uint256 value);
    event Approval(address indexed owner, address indexed spender, uint256 value);
    event AuthorizationUsed(address indexed authorizer, bytes32 indexed nonce);
    event AuthorizationCanceled(address indexed authorizer, bytes32 indexed nonce);

    // ------------------------------------------------------------------ construction

    constructor(string memory name_, string memory version_, string memory symbol_, uint8 decimals_) {
        name = name_;
        symbol = symbol_;
        decimals = decimals_;
        owner = msg.sender;
        DOMAIN_SEPARATOR = keccak256(
            abi.encode(
                EIP712_DOMAIN_TYPEHASH,
                keccak256(bytes(name_)),
                keccak256(bytes(version_)),
                block.chainid,
                address(this)
            )
        );
    }

    modifier onlyOwner() {
        require(msg.sender == owner, "TestToken: caller is not the owner");
        _;
    }

    // ------------------------------------------------------------------ minting

    function mint(address to, uint256 amount) external onlyOwner {
        require(to != address(0), "TestToken: mint to the zero address");
        totalSupply += amount;
        // Cannot overflow: every balance is bounded by totalSupply, which was checked above.
        unchecked {
            _balances[to] += amount;
        }
        emit Transfer(address(0), to, amount);
    }

    /// @notice Mint `amount` to every address in `to`.
    function mintBatch(address[] calldata to, uint256 amount) external onlyOwner {
        uint256 n = to.length;
        totalSupply += amount * n;
        for (uint256 i; i < n; ) {
            address account = to[i];
            require(account != address(0), "TestToken: mint to the zero address");
            // Cannot overflow: bounded by totalSupply (checked above).
            unchecked {
                _balances[account] += amount;
            }
            emit Transfer(address(0), account, amount);
            unchecked {
                ++i;
            }
        }
    }

    // ------------------------------------------------------------------ ERC-20

    function balanceOf(address account) external view returns (uint256) {
        return _balances[account];
    }

    function allowance(address owner_, address spender) external view returns (uint256) {
        return _allowances[owner_][spender];
    }

    function transfer(address to, uint256 value) external returns (bool) {
        _transfer(msg.sender, to, value);
        return true;
    }

    function approve(address spender, uint256 value) external returns (bool) {
        _approve(msg.sender, spender, value);
        return true;
    }

    function transferFrom(address from, address to, uint256 value) external returns (bool) {
        uint256 allowed = _allowances[from][msg.sender];
        require(value <= allowed, "ERC20: transfer amount exceeds allowance");
        _transfer(from, to, value);
        unchecked {
            _allowances[from][msg.sender] = allowed - value;
        }
        return true;
    }

    // ------------------------------------------------------------------ EIP-3009

    /// @notice True when the authorization `nonce` of `authorizer` has been used or canceled.
    function authorizationState(address authorizer, bytes32 nonce) external view returns (bool) {
        return _authorizationStates[authorizer][nonce];
    }

    /// @notice The (v, r, s) form. As in USDC v2.2, a payer with code is asked through EIP-1271
    ///         with the packed r || s || v; any other payer is checked by ECDSA.
    function transferWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        uint8 v,
        bytes32 r,
        bytes32 s
    ) external {
        if (from.code.length > 0) {
            _contractAuthorizedTransfer(from, to, value, validAfter, validBefore, nonce, abi.encodePacked(r, s, v));
            return;
        }
        _authorizedTransfer(TRANSFER_WITH_AUTHORIZATION_TYPEHASH, from, to, value, validAfter, validBefore, nonce, v, r, s);
    }

    /// @notice The bytes-signature form (USDC v2.2): a payer with code (a smart wallet) is
    ///         asked through EIP-1271 `isValidSignature`, any other takes a 65-byte r || s || v.
    function transferWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        bytes memory signature
    ) external {
        if (from.code.length > 0) {
            _contractAuthorizedTransfer(from, to, value, validAfter, validBefore, nonce, signature);
            return;
        }
        (uint8 v, bytes32 r, bytes32 s) = _splitSignature(signature);
        _authorizedTransfer(TRANSFER_WITH_AUTHORIZATION_TYPEHASH, from, to, value, validAfter, validBefore, nonce, v, r, s);
    }

    function receiveWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        uint8 v,
        bytes32 r,
        bytes32 s
    ) external {
        require(to == msg.sender, "FiatTokenV2: caller must be the payee");
        _authorizedTransfer(RECEIVE_WITH_AUTHORIZATION_TYPEHASH, from, to, value, validAfter, validBefore, nonce, v, r, s);
    }

    function receiveWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        bytes memory signature
    ) external {
        require(to == msg.sender, "FiatTokenV2: caller must be the payee");
        (uint8 v, bytes32 r, bytes32 s) = _splitSignature(signature);
        _authorizedTransfer(RECEIVE_WITH_AUTHORIZATION_TYPEHASH, from, to, value, validAfter, validBefore, nonce, v, r, s);
    }

    function cancelAuthorization(address authorizer, bytes32 nonce, uint8 v, bytes32 r, bytes32 s) external {
        _requireUnusedAuthorization(authorizer, nonce);
        _requireValidSignature(authorizer, keccak256(abi.encode(CANCEL_AUTHORIZATION_TYPEHASH, authorizer, nonce)), v, r, s);
        _cancelAuthorization(authorizer, nonce);
    }

    function cancelAuthorization(address authorizer, bytes32 nonce, bytes memory signature) external {
        _requireUnusedAuthorization(authorizer, nonce);
        (uint8 v, bytes32 r, bytes32 s) = _splitSignature(signature);
        _requireValidSignature(authorizer, keccak256(abi.encode(CANCEL_AUTHORIZATION_TYPEHASH, authorizer, nonce)), v, r, s);
        _cancelAuthorization(authorizer, nonce);
    }

    // ------------------------------------------------------------------ internals

    /// @dev The checks and effects shared by both authorization kinds and signature forms.
    function _authorizedTransfer(
        bytes32 typehash,
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        uint8 v,
        bytes32 r,
        bytes32 s
    ) private {
        _requireValidAuthorization(from, nonce, validAfter, validBefore);
        _requireValidSignature(from, _structHash(typehash, from, to, value, validAfter, validBefore, nonce), v, r, s);
        _useAuthorization(from, nonce);
        _transfer(from, to, value);
    }

    /// @dev A transfer authorized by a contract payer (EIP-1271), checks in USDC's order.
    function _contractAuthorizedTransfer(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        bytes memory signature
    ) private {
        _requireValidAuthorization(from, nonce, validAfter, validBefore);
        bytes32 structHash = _structHash(TRANSFER_WITH_AUTHORIZATION_TYPEHASH, from, to, value, validAfter, validBefore, nonce);
        _requireValidContractSignature(from, _digest(structHash), signature);
        _useAuthorization(from, nonce);
        _transfer(from, to, value);
    }

    function _transfer(address from, address to, uint256 value) private {
        require(from != address(0), "ERC20: transfer from the zero address");
        require(to != address(0), "ERC20: transfer to the zero address");
        uint256 fromBalance = _balances[from];
        require(value <= fromBalance, "ERC20: transfer amount exceeds balance");
        unchecked {
            // Safe: value <= fromBalance (checked above).
            _balances[from] = fromBalance - value;
            // Safe: the sum of all balances equals totalSupply, which cannot overflow.
            _balances[to] += value;
        }
        emit Transfer(from, to, value);
    }

    function _approve(address owner_, address spender, uint256 value) private {
        require(owner_ != address(0), "ERC20: approve from the zero address");
        require(spender != address(0), "ERC20: approve to the zero address");
        _allowances[owner_][spender] = value;
        emit Approval(owner_, spender, value);
    }

    function _requireUnusedAuthorization(address authorizer, bytes32 nonce) private view {
        require(!_authorizationStates[authorizer][nonce], "FiatTokenV2: authorization is used or canceled");
    }

    function _requireValidAuthorization(
        address authorizer,
        bytes32 nonce,
        uint256 validAfter,
        uint256 validBefore
    ) private view {
        require(block.timestamp > validAfter, "FiatTokenV2: authorization is not yet valid");
        require(block.timestamp < validBefore, "FiatTokenV2: authorization is expired");
        _requireUnusedAuthorization(authorizer, nonce);
    }

    function _useAuthorization(address authorizer, bytes32 nonce) private {
        _authorizationStates[authorizer][nonce] = true;
        emit AuthorizationUsed(authorizer, nonce);
    }

    function _cancelAuthorization(address authorizer, bytes32 nonce) private {
        _authorizationStates[authorizer][nonce] = true;
        emit AuthorizationCanceled(authorizer, nonce);
    }

    /// @dev keccak256(abi.encode(typehash, from, to, value, validAfter, validBefore, nonce)),
    ///      hashed in place in free memory (nothing is allocated).
    function _structHash(
        bytes32 typehash,
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce
    ) private pure returns (bytes32 h) {
        assembly ("memory-safe") {
            let p := mload(0x40)
            mstore(p, typehash)
            mstore(add(p, 0x20), and(from, 0xffffffffffffffffffffffffffffffffffffffff))
            mstore(add(p, 0x40), and(to, 0xffffffffffffffffffffffffffffffffffffffff))
            mstore(add(p, 0x60), value)
            mstore(add(p, 0x80), validAfter)
            mstore(add(p, 0xa0), validBefore)
            mstore(add(p, 0xc0), nonce)
            h := keccak256(p, 0xe0)
        }
    }

    /// @dev Splits a 65-byte r || s || v signature.
    function _splitSignature(bytes memory signature) private pure returns (uint8 v, bytes32 r, bytes32 s) {
        require(signature.length == 65, "ECRecover: invalid signature length");
        assembly ("memory-safe") {
            r := mload(add(signature, 0x20))
            s := mload(add(signature, 0x40))
            v := byte(0, mload(add(signature, 0x60)))
        }
    }

    /// @dev The EIP-712 digest of `structHash` in this token's domain.
    function _digest(bytes32 structHash) private view returns (bytes32 digest) {
        bytes32 domainSeparator = DOMAIN_SEPARATOR;
        assembly ("memory-safe") {
            let p := mload(0x40)
            mstore(p, 0x1901000000000000000000000000000000000000000000000000000000000000)
            mstore(add(p, 0x02), domainSeparator)
            mstore(add(p, 0x22), structHash)
            digest := keccak256(p, 0x42)
        }
    }

    /// @dev Reverts unless the contract `signer` says `signature` is its own over `digest`
    ///      (EIP-1271: `isValidSignature` returns 0x1626ba7e). No ECDSA fallback.
    function _requireValidContractSignature(address signer, bytes32 digest, bytes memory signature) private view {
        (bool ok, bytes memory ret) =
            signer.staticcall(abi.encodeWithSelector(0x1626ba7e, digest, signature));
        require(
            ok && ret.length >= 32 && abi.decode(ret, (bytes4)) == bytes4(0x1626ba7e),
            "FiatTokenV2: invalid signature"
        );
    }

    /// @dev Reverts unless (v, r, s) is a valid, non-malleable signature by `signer`
    ///      over the EIP-712 digest of `structHash` in this token's domain.
    function _requireValidSignature(address signer, bytes32 structHash, uint8 v, bytes32 r, bytes32 s) private view {
        bytes32 digest = _digest(structHash);
        require(uint256(s) <= HALF_CURVE_ORDER, "ECRecover: invalid signature 's' value");
        require(v == 27 || v == 28, "ECRecover: invalid signature 'v' value");
        address recovered = ecrecover(digest, v, r, s);
        require(recovered != address(0), "ECRecover: invalid signature");
        require(recovered == signer, "FiatTokenV2: invalid signature");
    }
}
