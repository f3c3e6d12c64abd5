// Sign an x402 v2 exact-scheme (EIP-3009) EVM payment with the official TypeScript SDK
// and print the facilitator request body (/verify, /settle) as one JSON line.
//
// usage: node tests/ts/sign.mjs <privateKeyHex> <token> <payTo> <amount> <chainId>
//
// No network access: the EIP-3009 path of ExactEvmScheme only needs the signer's
// address and signTypedData, so no public client / RPC is configured.
import { x402Client } from "@x402/core/client";
import { ExactEvmScheme } from "@x402/evm/exact/client";
import { toClientEvmSigner } from "@x402/evm";
import { privateKeyToAccount } from "viem/accounts";

const [privateKey, token, payTo, amount, chainId] = process.argv.slice(2);
if (!privateKey || !token || !payTo || !amount || !chainId) {
  console.error("usage: node sign.mjs <privateKeyHex> <token> <payTo> <amount> <chainId>");
  process.exit(2);
}

const network = `eip155:${chainId}`;
const requirements = {
  scheme: "exact",
  network,
  asset: token,
  amount,
  payTo,
  maxTimeoutSeconds: 300,
  extra: { name: "USD Coin", version: "2" },
};

const key = privateKey.startsWith("0x") ? privateKey : `0x${privateKey}`;
const signer = toClientEvmSigner(privateKeyToAccount(key));

// Spend controls default to "known default assets only, capped at $1"; the test token
// is not a default asset, so turn them off.
const client = new x402Client()
  .register(network, new ExactEvmScheme(signer))
  .setSpendControls(false);

const paymentPayload = await client.createPaymentPayload({
  x402Version: 2,
  resource: { url: "http://127.0.0.1/resource" },
  accepts: [requirements],
});

process.stdout.write(
  JSON.stringify({ x402Version: 2, paymentPayload, paymentRequirements: requirements }) + "\n",
);
