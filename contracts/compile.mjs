#!/usr/bin/env node
// Reproducible build of the engine's contracts with the pinned solcjs (see package.json).
//
// Usage: node contracts/compile.mjs [OUT_DIR]      (default OUT_DIR: engine/dev/contracts, the
// package data the engine deploys from)
//
// Writes OUT_DIR/<Contract>.json for every contract below. The output is deterministic:
// fixed key order, 2-space indentation, trailing newline. Exits non-zero on compile errors.

import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const HERE = dirname(fileURLToPath(import.meta.url));
const require = createRequire(import.meta.url);
const solc = require("solc");

const COMPILER_VERSION = "0.8.37";
// Source unit name (relative, so the metadata hash does not depend on the checkout path) -> contracts.
const SOURCES = {
  "src/TestToken.sol": ["TestToken"],
  "src/X402Batcher.sol": ["X402Batcher"],
  "src/TestWallet.sol": ["TestWallet"],
  "src/WalletFactory.sol": ["WalletFactory"],
  "src/SignatureChecks.sol": ["SignatureChecks"],
  "src/CallBatch.sol": [],
  "src/ISignatureTransfer.sol": [],
  "src/X402OperatorBatcher.sol": ["X402OperatorBatcher"],
  "src/Permit2.sol": ["Permit2"],
  "src/Permit2Proxies.sol": ["X402ExactPermit2Proxy", "X402UptoPermit2Proxy"],
};

const SETTINGS = {
  evmVersion: "cancun",
  optimizer: { enabled: true, runs: 10000 },
  outputSelection: {
    "*": { "*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"] },
  },
};

function fail(message) {
  process.stderr.write(`compile.mjs: ${message}\n`);
  process.exit(1);
}

// Recursively sort object keys so the JSON text never depends on insertion order.
function sortKeys(value) {
  if (Array.isArray(value)) return value.map(sortKeys);
  if (value !== null && typeof value === "object") {
    const out = {};
    for (const key of Object.keys(value).sort()) out[key] = sortKeys(value[key]);
    return out;
  }
  return value;
}

const version = solc.version();
if (!version.startsWith(`${COMPILER_VERSION}+`)) {
  fail(`expected solc ${COMPILER_VERSION}, found ${version} (run npm install in contracts/)`);
}

const outDir = resolve(process.argv[2] ?? join(HERE, "..", "engine", "dev", "contracts"));

const input = {
  language: "Solidity",
  sources: Object.fromEntries(
    Object.keys(SOURCES).map((unit) => [unit, { content: readFileSync(join(HERE, unit), "utf8") }]),
  ),
  settings: SETTINGS,
};

const output = JSON.parse(solc.compile(JSON.stringify(input)));

let hasErrors = false;
for (const err of output.errors ?? []) {
  const isError = err.severity === "error";
  hasErrors ||= isError;
  process.stderr.write(`${err.formattedMessage ?? err.message}\n`);
}
if (hasErrors) fail("compilation failed");

mkdirSync(outDir, { recursive: true });
for (const [unit, names] of Object.entries(SOURCES)) {
  for (const contractName of names) {
    const compiled = output.contracts?.[unit]?.[contractName];
    if (!compiled) fail(`no output for ${unit}:${contractName}`);
    const artifact = {
      contractName,
      abi: sortKeys(compiled.abi),
      bytecode: `0x${compiled.evm.bytecode.object}`,
      deployedBytecode: `0x${compiled.evm.deployedBytecode.object}`,
      compiler: COMPILER_VERSION,
      settings: sortKeys(SETTINGS),
    };
    const file = join(outDir, `${contractName}.json`);
    writeFileSync(file, `${JSON.stringify(artifact, null, 2)}\n`);
    process.stdout.write(`wrote ${file}\n`);
  }
}
