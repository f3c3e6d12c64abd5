// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

import {TestWallet} from "./TestWallet.sol";

/// @title WalletFactory
/// @notice Deploys TestWallets with CREATE2, so a wallet's address is known (counterfactual)
///         before it exists: what an ERC-6492 signature's factory call deploys.
contract WalletFactory {
    event WalletCreated(address indexed wallet, address indexed owner, bytes32 salt);

    /// @notice Deploy the wallet of (`owner`, `salt`), or return it if it exists already.
    function createWallet(address owner, bytes32 salt) external returns (address wallet) {
        wallet = walletAddress(owner, salt);
        if (wallet.code.length == 0) {
            wallet = address(new TestWallet{salt: salt}(owner));
            emit WalletCreated(wallet, owner, salt);
        }
    }

    /// @notice The address `createWallet(owner, salt)` deploys to.
    function walletAddress(address owner, bytes32 salt) public view returns (address) {
        bytes32 code = keccak256(abi.encodePacked(type(TestWallet).creationCode, abi.encode(owner)));
        return address(uint160(uint256(keccak256(abi.encodePacked(bytes1(0xff), address(this), salt, code)))));
    }
}
