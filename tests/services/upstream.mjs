// Upstream API that Envoy routes to in Gatehouse's tests.
//
//   node tests/services/upstream.mjs --name vehicles|stations --port N
//
// Serves a small fixed data set under /<name>, a few large or slow bodies
// for the reshape and timeout paths, and /__requests, the last requests it
// received, so a test can see exactly what Gatehouse and Envoy forwarded.
// Uses node:http only. Prints `upstream <name> ready <port>` once it listens.

import { fstatSync } from 'node:fs';
import { createServer } from 'node:http';
import { parseArgs } from 'node:util';
import { gzipSync } from 'node:zlib';

const NAMES = ['vehicles', 'stations'];
const RECORD_LIMIT = 200;
const LARGE_BYTES = 5 * 1024 * 1024;
// At most, and within one record of, Gatehouse's default reshape limit of 1 MiB.
const MIB_BYTES = 1024 * 1024;
// Decodes to far more than any reshape limit, yet is small on the wire.
const BOMB_BYTES = 64 * 1024 * 1024;
const MAX_SLOW_MS = 30_000;
const UPDATED_AT = '2026-11-30T10:00:00Z';

// === data ===

const VEHICLES = [
  {
    id: 'v-1',
    vin: 'WVWZZZE1ZPP000101',
    model: 'Atlas E7',
    owner: { name: 'Ada Park', email: 'ada.park@example.com' },
    battery: { soc: 81.5, capacity_wh: 75000, health: 0.97 },
    location: { lat: 52.5208, lon: 13.4094 },
    updated_at: UPDATED_AT,
    internal_notes: null,
  },
  {
    id: 'v-2',
    vin: 'YV1XZK0V0R2000202',
    model: 'Kite City',
    owner: { name: 'Bruno Costa', email: 'bruno.costa@example.com' },
    battery: { soc: 34.0, capacity_wh: 42000, health: 0.91 },
    location: { lat: 48.1372, lon: 11.5756 },
    updated_at: UPDATED_AT,
    internal_notes: 'battery swap booked; do not show to customers',
  },
  {
    id: 'v-3',
    vin: '5YJ3E1EA7RF000303',
    model: 'Atlas E5 Van',
    owner: { name: 'Chen Wei', email: 'chen.wei@example.com' },
    battery: { soc: 99.0, capacity_wh: 90000, health: 0.99 },
    location: { lat: 50.1109, lon: 8.6821 },
    updated_at: UPDATED_AT,
    internal_notes: null,
  },
];

const STATIONS = [
  {
    id: 's-1',
    name: 'Alexanderplatz Garage',
    operator: 'Volta Grid',
    connectors: [
      { type: 'CCS2', power_w: 150000, available: true },
      { type: 'Type2', power_w: 22000, available: false },
    ],
    location: { lat: 52.5219, lon: 13.4132 },
    updated_at: UPDATED_AT,
  },
  {
    id: 's-2',
    name: 'Marienplatz Kerbside',
    operator: 'CityCharge',
    connectors: [{ type: 'Type2', power_w: 11000, available: true }],
    location: { lat: 48.1374, lon: 11.5755 },
    updated_at: UPDATED_AT,
  },
  {
    id: 's-3',
    name: 'A5 Services North',
    operator: 'Volta Grid',
    connectors: [
      { type: 'CCS2', power_w: 350000, available: true },
      { type: 'CCS2', power_w: 350000, available: true },
      { type: 'CHAdeMO', power_w: 50000, available: false },
    ],
    location: { lat: 50.0333, lon: 8.5706 },
    updated_at: UPDATED_AT,
  },
];

const DATA = { vehicles: VEHICLES, stations: STATIONS };

// The same bytes on every run, so a test can compare digests.
function deterministicBytes(length) {
  const buf = Buffer.allocUnsafe(length);
  let x = 0x9e3779b9;
  for (let i = 0; i < length; i += 1) {
    // xorshift32
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    buf[i] = x & 0xff;
  }
  return buf;
}

// About `bytes` of JSON (at least, or at most when `under`): the records
// repeated with distinct ids.
function bigDocument(name, bytes = LARGE_BYTES, under = false) {
  const base = DATA[name];
  const items = [];
  let size = 64;
  for (let i = 0; size < bytes; i += 1) {
    const item = { ...base[i % base.length], id: `${name[0]}-big-${i}` };
    const length = JSON.stringify(item).length + 1;
    if (under && size + length > bytes) break;
    items.push(item);
    size += length;
  }
  return Buffer.from(JSON.stringify({ items, count: items.length }));
}

// Built on first use: most runs never ask for them.
const lazy = (build) => {
  let value;
  return () => (value ??= build());
};
const downloadBody = lazy(() => deterministicBytes(LARGE_BYTES));
const bombBody = lazy(() => gzipSync(Buffer.from(`{"pad":"${'0'.repeat(BOMB_BYTES)}"}`)));

// === http ===

function send(res, status, type, body, extra = {}) {
  const bytes = Buffer.isBuffer(body) ? body : Buffer.from(body);
  res.writeHead(status, {
    'content-type': type,
    'content-length': bytes.length,
    ...extra,
  });
  res.end(bytes);
}

function sendJson(res, status, value, extra) {
  send(res, status, 'application/json', JSON.stringify(value), extra);
}

function notFound(res, path) {
  sendJson(res, 404, { error: 'not_found', path });
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    req.on('data', (chunk) => chunks.push(chunk));
    req.on('end', () => resolve(Buffer.concat(chunks)));
    req.on('error', reject);
  });
}

function makeHandler(name) {
  const records = [];
  const big = lazy(() => bigDocument(name));
  const mib = lazy(() => bigDocument(name, MIB_BYTES, true));
  const prefix = `/${name}`;

  const text = [
    `${name} service`,
    `records: ${DATA[name].length}`,
    `updated: ${UPDATED_AT}`,
    '',
  ].join('\n');

  return async (req, res) => {
    const url = new URL(req.url, 'http://upstream');
    const path = url.pathname;

    // The request log is for tests; it does not log itself.
    if (path === '/__requests') {
      if (req.method === 'GET') return sendJson(res, 200, records);
      if (req.method === 'DELETE') {
        const cleared = records.length;
        records.length = 0;
        return sendJson(res, 200, { cleared });
      }
      return sendJson(res, 405, { error: 'method_not_allowed' }, { allow: 'GET, DELETE' });
    }

    const body = await readBody(req);
    records.push({
      method: req.method,
      path: req.url,
      headers: req.headers,
      body_bytes: body.length,
      at: new Date().toISOString(),
    });
    if (records.length > RECORD_LIMIT) records.shift();

    if (path !== prefix && !path.startsWith(`${prefix}/`)) return notFound(res, path);
    const rest = path.slice(prefix.length).replace(/^\/|\/$/g, '');

    // Writes are echoed, so scope checks on them have something to reach.
    if (['POST', 'PUT', 'PATCH', 'DELETE'].includes(req.method)) {
      const status = req.method === 'POST' ? 201 : 200;
      const echo = { ok: true, method: req.method, path, received_bytes: body.length };
      return sendJson(res, status, echo);
    }
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      const allow = 'GET, HEAD, POST, PUT, PATCH, DELETE';
      return sendJson(res, 405, { error: 'method_not_allowed' }, { allow });
    }

    switch (rest) {
      case '': {
        const etag = '"list-v1"';
        if (req.headers['if-none-match'] === etag) {
          res.writeHead(304, { etag });
          return res.end();
        }
        const items = DATA[name];
        return sendJson(res, 200, { items, count: items.length }, { etag });
      }
      case 'partial': {
        // A range of a JSON document is not JSON a profile could apply to.
        const json = JSON.stringify({ items: DATA[name] });
        const part = json.slice(0, 40);
        const range = `bytes 0-${part.length - 1}/${json.length}`;
        return send(res, 206, 'application/json', part, { 'content-range': range });
      }
      case 'gzip': {
        const items = DATA[name];
        const packed = gzipSync(Buffer.from(JSON.stringify({ items, count: items.length })));
        return send(res, 200, 'application/json', packed, { 'content-encoding': 'gzip' });
      }
      case 'bomb':
        return send(res, 200, 'application/json', bombBody(), { 'content-encoding': 'gzip' });
      case 'encoded': {
        // An encoding nobody here decodes; the bytes are plain JSON so a
        // test can see they arrived untouched.
        const items = DATA[name];
        const json = JSON.stringify({ items, count: items.length });
        return send(res, 200, 'application/json', json, { 'content-encoding': 'x-custom' });
      }
      case 'chunked': {
        // No content-length: node sends transfer-encoding: chunked.
        const items = DATA[name];
        const json = JSON.stringify({ items, count: items.length });
        const half = Math.floor(json.length / 2);
        res.writeHead(200, { 'content-type': 'application/json' });
        res.write(json.slice(0, half));
        setTimeout(() => res.end(json.slice(half)), 20);
        return undefined;
      }
      case 'chunked-big': {
        // Larger than Envoy's buffer, of unknown length.
        res.writeHead(200, { 'content-type': 'application/json' });
        res.write(big());
        res.end();
        return undefined;
      }
      case 'invalid':
        return send(res, 200, 'application/json', '{"items": [ {"id": "v-1", ');
      case 'error': {
        const failure = { error: 'upstream_failed', internal_notes: 'db down', vin: 'X' };
        return sendJson(res, 503, failure);
      }
      case 'mib':
        return send(res, 200, 'application/json', mib());
      case 'download':
        return send(res, 200, 'application/octet-stream', downloadBody());
      case 'big':
        return send(res, 200, 'application/json', big());
      case 'text':
        return send(res, 200, 'text/plain; charset=utf-8', text);
      case 'status':
        return sendJson(res, 200, { service: name, status: 'ok' });
      case 'slow': {
        const asked = Number(url.searchParams.get('ms') ?? 1000);
        const ms = Number.isFinite(asked) ? Math.min(Math.max(asked, 0), MAX_SLOW_MS) : 1000;
        const timer = setTimeout(() => sendJson(res, 200, { slept_ms: ms }), ms);
        res.on('close', () => clearTimeout(timer));
        return undefined;
      }
      default: {
        const item = DATA[name].find((entry) => entry.id === rest);
        if (item) return sendJson(res, 200, item);
        return notFound(res, path);
      }
    }
  };
}

// === process ===

function fail(message) {
  process.stderr.write(`upstream: ${message}\n`);
  process.exit(1);
}

function parseCli() {
  let values;
  try {
    ({ values } = parseArgs({
      options: { name: { type: 'string' }, port: { type: 'string' } },
      strict: true,
    }));
  } catch (err) {
    fail(`${err.message}\nusage: upstream.mjs --name vehicles|stations --port N`);
  }
  if (!NAMES.includes(values.name)) fail(`--name must be one of ${NAMES.join(', ')}`);

  const port = Number(values.port);
  if (values.port === undefined || !Number.isInteger(port) || port < 0 || port > 65535) {
    fail('--port N is required (0 picks a free port)');
  }
  return { name: values.name, port };
}

// Exits when the parent holding our stdin goes away, but only if stdin is a
// pipe or socket: a terminal or /dev/null says nothing about the parent.
function exitWithParent(stop) {
  let stat;
  try {
    stat = fstatSync(0);
  } catch {
    return;
  }
  if (!stat.isFIFO() && !stat.isSocket()) return;

  process.stdin.on('end', stop);
  process.stdin.on('close', stop);
  process.stdin.on('error', stop);
  process.stdin.resume();
}

function main() {
  const { name, port } = parseCli();
  const handler = makeHandler(name);

  const server = createServer((req, res) => {
    handler(req, res).catch((err) => {
      process.stderr.write(`upstream: ${req.method} ${req.url}: ${err.message}\n`);
      if (!res.headersSent) sendJson(res, 500, { error: 'internal' });
      else res.destroy();
    });
  });

  server.on('error', (err) => fail(`cannot listen on 127.0.0.1:${port}: ${err.message}`));
  server.listen(port, '127.0.0.1', () => {
    process.stdout.write(`upstream ${name} ready ${server.address().port}\n`);
  });

  let stopping = false;
  const stop = () => {
    if (stopping) return;
    stopping = true;
    server.close(() => process.exit(0));
    server.closeAllConnections();
    setTimeout(() => process.exit(0), 1000).unref();
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  exitWithParent(stop);
}

main();
