// OAuth2 provider for Gatehouse's tests and local runs.
//
//   node tests/provider/provider.mjs --port N [--keys FILE] [--issuer URL]
//                                    [--jwks-max-age SECONDS]
//
// Issues client_credentials tokens for two resource servers: JWT access
// tokens for https://api.gatehouse.test (checked by Gatehouse against /jwks)
// and opaque ones for https://opaque.gatehouse.test (checked through
// introspection). Tokens other than JWTs live in memory and die with the
// process. Prints `provider ready <issuer>` once it listens. A few test
// controls live under /__ (see main).

import { createHash, generateKeyPairSync } from 'node:crypto';
import { existsSync, fstatSync, readFileSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { parseArgs } from 'node:util';

import Provider, { errors } from 'oidc-provider';

const JWT_RESOURCE = 'https://api.gatehouse.test';
const OPAQUE_RESOURCE = 'https://opaque.gatehouse.test';
const SCOPES = 'vehicles:read stations:read vehicles:write';
const ACCESS_TOKEN_TTL = 600;

// The client Gatehouse authenticates as when it calls introspection.
const INTROSPECTOR = 'gatehouse';

// Extra claims in the access tokens of some clients: the kiosk's tokens
// name the profile it gets, for tests of a profile chosen by a claim.
const TOKEN_CLAIMS = {
  'demo-kiosk': { app_profile: 'partner' },
};

const CLIENTS = [
  ['demo-web', 'demo-web-secret'],
  ['demo-mobile', 'demo-mobile-secret'],
  ['demo-partner', 'demo-partner-secret'],
  ['demo-kiosk', 'demo-kiosk-secret'],
  [INTROSPECTOR, 'gatehouse-introspection-secret'],
].map(([id, secret]) => ({
  client_id: id,
  client_secret: secret,
  token_endpoint_auth_method: 'client_secret_basic',
  grant_types: ['client_credentials'],
  response_types: [],
  redirect_uris: [],
  scope: SCOPES,
}));

function fail(message) {
  process.stderr.write(`provider: ${message}\n`);
  process.exit(1);
}

function parseCli() {
  let values;
  try {
    ({ values } = parseArgs({
      options: {
        port: { type: 'string' },
        keys: { type: 'string' },
        issuer: { type: 'string' },
        'jwks-max-age': { type: 'string' },
      },
      strict: true,
    }));
  } catch (err) {
    fail(`${err.message}\nusage: provider.mjs --port N [--keys FILE] [--issuer URL] [--jwks-max-age S]`);
  }

  const port = Number(values.port);
  if (values.port === undefined || !Number.isInteger(port) || port < 0 || port > 65535) {
    fail('--port N is required (0 picks a free port)');
  }
  const jwksMaxAge = values['jwks-max-age'] === undefined ? undefined : Number(values['jwks-max-age']);
  if (jwksMaxAge !== undefined && !(Number.isInteger(jwksMaxAge) && jwksMaxAge >= 0)) {
    fail('--jwks-max-age takes whole seconds');
  }
  return { port, keysFile: values.keys, issuer: values.issuer, jwksMaxAge };
}

// RFC 7638 thumbprint, so a generated key gets a stable, meaningful kid.
function thumbprint(jwk) {
  const members = JSON.stringify({ e: jwk.e, kty: jwk.kty, n: jwk.n });
  return createHash('sha256').update(members).digest('base64url');
}

function newSigningKey() {
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = privateKey.export({ format: 'jwk' });
  return { ...jwk, kid: thumbprint(jwk), alg: 'RS256', use: 'sig' };
}

// Loads the private JWK set, creating the file on first use so that JWTs
// stay valid across restarts. The first key signs; the others are only
// published, which is how a rotation is staged.
function loadKeys(file) {
  if (file === undefined) {
    process.stderr.write('provider: no --keys file, signing with a throwaway key\n');
    return { keys: [newSigningKey()] };
  }

  if (!existsSync(file)) {
    const jwks = { keys: [newSigningKey()] };
    writeFileSync(file, `${JSON.stringify(jwks, null, 2)}\n`, { mode: 0o600 });
    process.stderr.write(`provider: wrote a new signing key to ${file}\n`);
    return jwks;
  }

  let jwks;
  try {
    jwks = JSON.parse(readFileSync(file, 'utf8'));
  } catch (err) {
    fail(`cannot read key set ${file}: ${err.message}`);
  }
  if (!Array.isArray(jwks?.keys) || jwks.keys.length === 0) {
    fail(`${file} must hold a JWK set: {"keys": [...]}`);
  }
  for (const [i, key] of jwks.keys.entries()) {
    if (key.kty !== 'RSA' || typeof key.d !== 'string') {
      fail(`${file}: key ${i} is not an RSA private key`);
    }
  }

  // Sign only with RS256, whatever the file leaves out.
  const keys = jwks.keys.map((key) => ({ alg: 'RS256', use: 'sig', ...key }));
  return { keys };
}

// Settings tests may change while the provider runs.
const settings = { opaqueTtl: ACCESS_TOKEN_TTL };

function resourceServer(resource) {
  const common = { scope: SCOPES, audience: resource, accessTokenTTL: ACCESS_TOKEN_TTL };
  if (resource === JWT_RESOURCE) {
    return { ...common, accessTokenFormat: 'jwt', jwt: { sign: { alg: 'RS256' } } };
  }
  if (resource === OPAQUE_RESOURCE) {
    return { ...common, accessTokenTTL: settings.opaqueTtl, accessTokenFormat: 'opaque' };
  }
  throw new errors.InvalidTarget();
}

function buildProvider(issuer, jwks) {
  const provider = new Provider(issuer, {
    clients: CLIENTS,
    jwks,
    scopes: ['openid', ...SCOPES.split(' ')],
    extraTokenClaims: (ctx, token) => TOKEN_CLAIMS[token.clientId],
    // Client credentials tokens live as long as their resource server says.
    ttl: {
      ClientCredentials: (ctx, token) => token.resourceServer?.accessTokenTTL ?? ACCESS_TOKEN_TTL,
    },
    // Cookies matter only to interactive flows, which are off; fixed keys
    // keep the provider from warning about them.
    cookies: { keys: ['gatehouse-test-cookie-key'] },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      introspection: {
        enabled: true,
        // Gatehouse may look at any client's token; a client at its own.
        allowedPolicy: (ctx, client, token) =>
          client.clientId === INTROSPECTOR || client.clientId === token.clientId,
      },
      revocation: {
        enabled: true,
        // A client revokes only the tokens it was issued.
        allowedPolicy: (ctx, client, token) => client.clientId === token.clientId,
      },
      resourceIndicators: {
        enabled: true,
        defaultResource: (ctx, client, oneOf) => oneOf,
        useGrantedResource: () => false,
        getResourceServerInfo: (ctx, resource) => resourceServer(resource),
      },
    },
  });

  // Keep failed requests visible: they are what a test author needs to see.
  provider.on('server_error', (ctx, err) => {
    process.stderr.write(`provider: server error on ${ctx.path}: ${err.stack}\n`);
  });
  return provider;
}

// Exits when the parent that holds our stdin goes away, so a test harness
// that dies never leaves a provider behind. Only a pipe or a socket counts:
// a terminal or /dev/null says nothing about the parent.
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
  const { port, keysFile, issuer: fixedIssuer, jwksMaxAge } = parseCli();
  const jwks = loadKeys(keysFile);

  // The issuer names the port, so the provider is built once the socket is
  // bound (this is what makes --port 0 work).
  let handle = (req, res) => {
    res.statusCode = 503;
    res.end();
  };

  // Test controls, outside the OAuth2 surface:
  //   GET  /__stats               how often the key set and introspection were called
  //   POST /__delay?ms=N          answer /jwks and introspection N ms late
  //   POST /__opaque_ttl?seconds=N  lifetime of opaque tokens issued from now on
  //   POST /__introspection_status?code=N  answer introspection with status N
  //                               and no body (0: answer normally)
  const stats = { jwks: 0, introspection: 0 };
  let delayMs = 0;
  let introspectionStatus = 0;
  const server = createServer((req, res) => {
    const url = new URL(req.url ?? '/', 'http://provider.invalid');
    const number = (name) => Number(url.searchParams.get(name) ?? 0);
    if (url.pathname === '/__stats') {
      res.setHeader('content-type', 'application/json');
      res.end(JSON.stringify(stats));
      return;
    }
    if (url.pathname === '/__delay' && req.method === 'POST') {
      delayMs = number('ms');
      res.end();
      return;
    }
    if (url.pathname === '/__opaque_ttl' && req.method === 'POST') {
      settings.opaqueTtl = number('seconds') || ACCESS_TOKEN_TTL;
      res.end();
      return;
    }
    if (url.pathname === '/__introspection_status' && req.method === 'POST') {
      introspectionStatus = number('code');
      res.end();
      return;
    }

    const slow = url.pathname === '/jwks' || url.pathname === '/token/introspection';
    if (url.pathname === '/jwks') {
      stats.jwks += 1;
      if (jwksMaxAge !== undefined) res.setHeader('cache-control', `max-age=${jwksMaxAge}`);
    }
    if (url.pathname === '/token/introspection') {
      stats.introspection += 1;
      if (introspectionStatus !== 0) {
        res.statusCode = introspectionStatus;
        res.end();
        return;
      }
    }
    if (slow && delayMs > 0) {
      setTimeout(() => handle(req, res), delayMs);
      return;
    }
    handle(req, res);
  });

  server.on('error', (err) => fail(`cannot listen on 127.0.0.1:${port}: ${err.message}`));
  server.listen(port, '127.0.0.1', () => {
    const bound = server.address().port;
    const issuer = fixedIssuer ?? `http://127.0.0.1:${bound}`;
    let provider;
    try {
      provider = buildProvider(issuer, jwks);
    } catch (err) {
      fail(`bad configuration: ${err.message}`);
    }
    handle = provider.callback();
    process.stdout.write(`provider ready ${issuer}\n`);
  });

  let stopping = false;
  const stop = () => {
    if (stopping) return;
    stopping = true;
    server.close(() => process.exit(0));
    server.closeAllConnections();
    // Do not hang on a client that will not let go.
    setTimeout(() => process.exit(0), 1000).unref();
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  exitWithParent(stop);
}

main();
