"""Recover the signer of SDK-made payloads with our own EIP-712 (TransferWithAuthorization) code."""
import json, subprocess, sys
from eth_account import Account
from eth_account.messages import encode_typed_data

out = json.loads(subprocess.check_output([sys.executable, ".scratch/x402_make_payloads.py"]))
for v in ("v2", "v1"):
    auth = out[v]["paymentPayload"]["payload"]["authorization"]
    sig = out[v]["paymentPayload"]["payload"]["signature"]
    td = {
        "types": {
            "EIP712Domain": [{"name": "name", "type": "string"}, {"name": "version", "type": "string"},
                             {"name": "chainId", "type": "uint256"}, {"name": "verifyingContract", "type": "address"}],
            "TransferWithAuthorization": [{"name": "from", "type": "address"}, {"name": "to", "type": "address"},
                {"name": "value", "type": "uint256"}, {"name": "validAfter", "type": "uint256"},
                {"name": "validBefore", "type": "uint256"}, {"name": "nonce", "type": "bytes32"}],
        },
        "primaryType": "TransferWithAuthorization",
        "domain": {"name": "USD Coin", "version": "2", "chainId": 31337,
                   "verifyingContract": "0x5FbDB2315678afecb367f032d93F642f64180aa3"},
        "message": {"from": auth["from"], "to": auth["to"], "value": int(auth["value"]),
                    "validAfter": int(auth["validAfter"]), "validBefore": int(auth["validBefore"]),
                    "nonce": bytes.fromhex(auth["nonce"][2:])},
    }
    rec = Account.recover_message(encode_typed_data(full_message=td), signature=sig)
    print(v, "recovered", rec, "== payer:", rec == out["payer"], "sig len", (len(sig) - 2) // 2)
