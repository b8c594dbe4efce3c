// RudderStack's transformer on the same work as bench/transform.py: the event mix, repeated with fresh
// messageIds, through the Klaviyo destination's router transform (v2 path, the one this project
// follows), in chunks of 1000 as rudder-server hands them over. Prints figures; asserts nothing.
//
// It runs inside a checkout of rudderlabs/rudder-transformer (the reference read c98d160cfadd), with
// its dependencies installed and tsx to load its TypeScript:
//
//   git clone https://github.com/rudderlabs/rudder-transformer ../rudder-transformer
//   git -C ../rudder-transformer checkout c98d160cfadd
//   (cd ../rudder-transformer && npm install --ignore-scripts --no-audit --no-fund && npm install --no-save tsx)
//   (cd ../rudder-transformer && node --import tsx "$OLDPWD/bench/rudderstack_transform.mjs")
//
// Options: --events N (default 100000), --chunk N (default 1000), --repeat N (default 3),
// --mix PATH (default ../shared/bench/events-mix.json beside this repository).
//
// Printed, one process on one core: a baseline in the same run (JSON.parse + JSON.stringify of every
// payload, the floor any Node worker pays: compare it with bench/transform.py's), the router
// transform alone (processRouterDest per chunk: what bench/transform.py's "transform + batch"
// does), and with the outputs serialised (what its "decode + transform + batch + serialise" does).
// The transformer's user-transformation sandbox (isolated-vm, a native module that
// --ignore-scripts leaves unbuilt) is not on this path and is stubbed out.

import { createRequire } from 'node:module';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const options = { events: 100000, chunk: 1000, repeat: 3, mix: path.join(here, '..', '..', 'shared', 'bench', 'events-mix.json') };
for (let i = 2; i < process.argv.length; i += 2) {
  const key = process.argv[i].replace(/^--/, '');
  if (!(key in options)) throw new Error(`unknown option --${key}`);
  options[key] = key === 'mix' ? process.argv[i + 1] : Number(process.argv[i + 1]);
}

const require = createRequire(path.join(process.cwd(), 'package.json'));
const Module = require('node:module');
const load = Module._load;
Module._load = function stubbed(request, ...rest) {
  return request === 'isolated-vm' ? {} : load.call(this, request, ...rest);
};
process.env.LOG_LEVEL = process.env.LOG_LEVEL || 'error';
const { processRouterDest } = require('./src/v0/destinations/klaviyo/transform');
const commit = (() => {
  try {
    return readFileSync(path.join(process.cwd(), '.git', 'HEAD'), 'utf8').trim();
  } catch {
    return 'unknown';
  }
})();

const mix = JSON.parse(readFileSync(options.mix, 'utf8'));
const payloads = Array.from({ length: options.events }, (_, i) =>
  JSON.stringify({ ...mix[i % mix.length], messageId: `00000000-0000-0000-0000-${String(i).padStart(12, '0')}` }),
);
const destination = {
  ID: 'bench',
  Name: 'klaviyo',
  Config: { privateApiKey: 'pk_bench', apiVersion: 'v2', listId: 'XUepkK', consent: ['email'] },
  DestinationDefinition: { ID: 'klaviyo', Name: 'KLAVIYO', DisplayName: 'Klaviyo', Config: {} },
  Enabled: true,
};

function rate(count, started) {
  return count / (Number(process.hrtime.bigint() - started) / 1e9);
}

function baseline() {
  const started = process.hrtime.bigint();
  for (const payload of payloads) JSON.stringify(JSON.parse(payload));
  return rate(payloads.length, started);
}

async function transformAll(serialise) {
  let outputs = 0;
  let errors = 0;
  let bytes = 0;
  let elapsed = 0n;
  for (let start = 0; start < payloads.length; start += options.chunk) {
    const inputs = payloads.slice(start, start + options.chunk).map((payload, i) => {
      const message = JSON.parse(payload);
      return { message, metadata: { jobId: start + i + 1, userId: message.userId || message.anonymousId }, destination };
    });
    const began = process.hrtime.bigint();
    const results = await processRouterDest(inputs, {});
    if (serialise) bytes += results.reduce((sum, result) => sum + JSON.stringify(result.batchedRequest ?? null).length, 0);
    elapsed += process.hrtime.bigint() - began;
    for (const result of results) (result.statusCode >= 400 ? (errors += 1) : (outputs += 1));
  }
  return { rate: payloads.length / (Number(elapsed) / 1e9), outputs, errors, bytes };
}

function median(values) {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)];
}

const fmt = (n) => Math.round(n).toLocaleString('en-US');
console.log(`rudder-transformer at ${commit}, node ${process.version}; ${fmt(payloads.length)} events in chunks of ${options.chunk}`);
console.log(`baseline: JSON.parse + JSON.stringify         ${fmt(baseline())} events/s`);
const passes = [];
let last;
for (let n = 0; n < options.repeat; n += 1) {
  last = await transformAll(false);
  passes.push(last.rate);
}
console.log(
  `router transform (processRouterDest)          ${fmt(Math.max(...passes))} events/s best of ${options.repeat}, median ${fmt(median(passes))}`,
);
console.log(`  ${fmt(last.outputs)} outputs, ${fmt(last.errors)} errors`);
const serialised = await transformAll(true);
console.log(`router transform + serialise the requests     ${fmt(serialised.rate)} events/s (${(serialised.bytes / 1e6).toFixed(0)} MB)`);
console.log(`peak RSS ${Math.round(process.resourceUsage().maxRSS / 1024)} MiB`);
