#!/usr/bin/env node
// facegate example client for Node.js: CheckLiveness on image files, IdentifyFromClip on a folder of frames.
//
//   node client.js [--target HOST:PORT] [--deadline-ms N] [--tls-ca FILE] liveness IMAGE...
//   node client.js [--target HOST:PORT] [--deadline-ms N] [--tls-ca FILE] identify COLLECTION DIR --fps F
//
// Caller identity: --token-file FILE sends "authorization: Bearer <token>" on every call; --tls-cert FILE and
// --tls-key FILE (with --tls-ca) present a client certificate for mutual TLS.
//
// The .proto files are loaded at run time; `npm run types` generates TypeScript types into gen/types.
'use strict';
const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = process.env.FACEGATE_PROTO_ROOT || path.join(__dirname, '..', '..', 'proto');

function parseArgs(argv) {
  const opts = {
    target: '127.0.0.1:50051', deadlineMs: 10000, caFile: null, certFile: null, keyFile: null, tokenFile: null,
    fps: 0, rest: [],
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--target') opts.target = argv[++i];
    else if (a === '--deadline-ms') opts.deadlineMs = Number(argv[++i]);
    else if (a === '--tls-ca') opts.caFile = argv[++i];
    else if (a === '--tls-cert') opts.certFile = argv[++i];
    else if (a === '--tls-key') opts.keyFile = argv[++i];
    else if (a === '--token-file') opts.tokenFile = argv[++i];
    else if (a === '--fps') opts.fps = Number(argv[++i]);
    else opts.rest.push(a);
  }
  return opts;
}

function framesOf(dir) {
  const number = (name) => {
    const m = path.parse(name).name.match(/\d+/g);
    return m ? Number(m[m.length - 1]) : -1;
  };
  return fs.readdirSync(dir)
    .filter((f) => /\.(jpe?g|png|webp|bmp)$/i.test(f))
    .sort((a, b) => number(a) - number(b) || a.localeCompare(b))
    .map((f) => path.join(dir, f));
}

// Every call: its deadline, and the bearer token (in `metadata`) when one is given.
function call(client, method, request, deadlineMs, metadata) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline: new Date(Date.now() + deadlineMs) }, (err, resp) =>
      (err ? reject(err) : resolve(resp)));
  });
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  if (opts.rest.length === 0) {
    console.error('usage: client.js [flags] liveness IMAGE... | identify COLLECTION DIR --fps F');
    process.exit(2);
  }
  const defs = protoLoader.loadSync(['facegate/v1/liveness.proto', 'facegate/v1/identification.proto'],
    { includeDirs: [PROTO_ROOT], keepCase: true, longs: String, enums: String, defaults: true, oneofs: true });
  const v1 = grpc.loadPackageDefinition(defs).facegate.v1;
  // With --tls-cert/--tls-key the client certificate identifies the caller (mutual TLS).
  const creds = opts.caFile ? grpc.credentials.createSsl(fs.readFileSync(opts.caFile),
    opts.keyFile ? fs.readFileSync(opts.keyFile) : null, opts.certFile ? fs.readFileSync(opts.certFile) : null)
    : grpc.credentials.createInsecure();
  const metadata = new grpc.Metadata();
  if (opts.tokenFile) metadata.add('authorization', `Bearer ${fs.readFileSync(opts.tokenFile, 'utf8').trim()}`);
  const options = { 'grpc.max_send_message_length': 64 << 20 };
  let failures = 0;
  const [command, ...args] = opts.rest;
  if (command === 'liveness') {
    const client = new v1.LivenessService(opts.target, creds, options);
    for (const file of args) {
      try {
        const r = await call(client, 'CheckLiveness', { image: { data: fs.readFileSync(file) } }, opts.deadlineMs,
          metadata);
        console.log(`${file}\t${r.decision.replace(/^DECISION_/, '')}\tlive_score=${r.live_score.toFixed(9)}`);
      } catch (err) {
        console.log(`${file}\tERROR\t${err.code}\t${err.details || err.message}`);
        failures++;
      }
    }
    client.close();
  } else if (command === 'identify' && args.length === 2) {
    const client = new v1.IdentificationService(opts.target, creds, options);
    const clip = { fps: opts.fps, frames: framesOf(args[1]).map((f) => ({ data: fs.readFileSync(f) })) };
    try {
      const r = await call(client, 'IdentifyFromClip', { collection: args[0], clip, top_k: 3 }, opts.deadlineMs,
        metadata);
      const top = r.candidates.length ? r.candidates[0] : { person_id: '-', score: 0 };
      console.log(`${args[1]}\t${r.decision.replace(/^MATCH_DECISION_/, '')}\tcandidate=${top.person_id}\t` +
        `score=${top.score.toFixed(9)}`);
    } catch (err) {
      console.log(`${args[1]}\tERROR\t${err.code}\t${err.details || err.message}`);
      failures++;
    }
    client.close();
  } else {
    console.error('unknown command');
    process.exit(2);
  }
  process.exit(failures ? 1 : 0);
}

main();
