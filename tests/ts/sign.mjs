// Sign an x402 v2 EVM payment with the official TypeScript SDK and print the facilitator
// request body (/verify, /settle) as one JSON line: `exact` with EIP-3009 (the default) or
// Permit2, or `upto` (Permit2, signed for <facilitatorAddress>).
//
// usage: node tests/ts/sign.mjs <privateKeyHex> <token> <payTo> <amount> <chainId>
//            [eip3009|permit2|upto] [facilitatorAddress]
//
// No network access: these paths only need the signer's address and signTypedData, so no
// public client / RPC is configured.
import { x402Client } from "@x402/core/client";
import { ExactEvmScheme } from "@x402/evm/exact/client";
import { UptoEvmScheme } from "@x402/evm/upto/client";
import { toClientEvmSigner } from "@x402/evm";
import { privateKeyToAccount } from "viem/accounts";

const [privateKey, token, payTo, amount, chainId, method = "eip3009", facilitator] =
  process.argv.slice(2);
if (!privateKey || !token || !payTo || !amount || !chainId) {
  console.error("usage: node sign.mjs <privateKeyHex> <token> <payTo> <amount> <chainId>");
  process.exit(2);
}

const network = `eip155:${chainId}`;
const extra = { name: "USD Coin", version: "2" };
if (method === "permit2") extra.assetTransferMethod = "permit2";
if (method === "upto") extra.facilitatorAddress = facilitator;
const requirements = {
  scheme: method === "upto" ? "upto" : "exact",
  network,
  asset: token,
  amount,
  payTo,
  maxTimeoutSeconds: 300,
  extra,
};

const key = privateKey.startsWith("0x") ? privateKey : `0x${privateKey}`;
const signer = toClientEvmSigner(privateKeyToAccount(key));

// Spend controls default to "known default assets only, capped at $1"; the test token
// is not a default asset, so turn them off.
const client = new x402Client()
  .register(network, new ExactEvmScheme(signer))
  .register(network, new UptoEvmScheme(signer))
  .setSpendControls(false);

const paymentPayload = await client.createPaymentPayload({
  x402Version: 2,
  resource: { url: "http://127.0.0.1/resource" },
  accepts: [requirements],
});

process.stdout.write(
  JSON.stringify({ x402Version: 2, paymentPayload, paymentRequirements: requirements }) + "\n",
);
