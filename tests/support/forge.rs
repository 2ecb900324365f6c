//! Making tokens by hand, with the provider's real private key or without it,
//! and calling Check straight over gRPC, for the tests that attack Gatehouse.
//!
//! Keys are converted with Node's own crypto (the provider's runtime), so the
//! tests sign with exactly the key the provider publishes.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use envoy_types::pb::envoy::service::auth::v3::attribute_context;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use jsonwebtoken::{Algorithm, EncodingKey};

/// One of the provider's signing keys, as PEM and with its `kid`.
pub struct SigningKey {
    /// The key's `kid` in the published JWKS.
    pub kid: String,
    /// The private key, PKCS#1 DER.
    pub private_der: Vec<u8>,
    /// The public key, SPKI PEM (what an HMAC forgery uses as its secret).
    pub public_pem: String,
}

impl SigningKey {
    /// The key for signing with RS256.
    pub fn encoding(&self) -> EncodingKey {
        EncodingKey::from_rsa_der(&self.private_der)
    }
}

fn node(script: &str, input: &str) -> String {
    use std::io::Write;

    let mut child = Command::new("node")
        .args(["--input-type=module", "-e", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("node is installed (run scripts/setup)");
    child
        .stdin
        .take()
        .expect("node's stdin")
        .write_all(input.as_bytes())
        .expect("write to node");
    let out = child.wait_with_output().expect("node finishes");
    assert!(out.status.success(), "node script failed");
    String::from_utf8(out.stdout).expect("utf-8 from node")
}

/// The keys in the provider's key file, signing key first.
pub fn provider_keys(file: &Path) -> Vec<SigningKey> {
    let text = std::fs::read_to_string(file).expect("read the provider's key file");
    let script = r#"
        import { createPrivateKey, createPublicKey } from 'node:crypto';
        let input = '';
        for await (const chunk of process.stdin) input += chunk;
        const out = JSON.parse(input).keys.map((jwk) => {
          const key = createPrivateKey({ key: jwk, format: 'jwk' });
          return {
            kid: jwk.kid,
            private_der: key.export({ type: 'pkcs1', format: 'der' }).toString('base64'),
            public_pem: createPublicKey(key).export({ type: 'spki', format: 'pem' }),
          };
        });
        process.stdout.write(JSON.stringify(out));
    "#;
    let out: serde_json::Value = serde_json::from_str(&node(script, &text)).expect("node's json");

    out.as_array()
        .expect("an array of keys")
        .iter()
        .map(|key| SigningKey {
            kid: key["kid"].as_str().expect("kid").to_owned(),
            private_der: base64::engine::general_purpose::STANDARD
                .decode(key["private_der"].as_str().expect("der"))
                .expect("base64 der"),
            public_pem: key["public_pem"].as_str().expect("pem").to_owned(),
        })
        .collect()
}

/// A fresh RSA private JWK (RS256, `use: sig`) with a random `kid`, in the
/// form the provider's key file holds.
pub fn new_private_jwk() -> serde_json::Value {
    let script = r#"
        import { generateKeyPairSync, randomUUID } from 'node:crypto';
        const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
        const jwk = privateKey.export({ format: 'jwk' });
        const extra = { kid: randomUUID(), alg: 'RS256', use: 'sig' };
        process.stdout.write(JSON.stringify({ ...jwk, ...extra }));
    "#;
    serde_json::from_str(&node(script, "")).expect("a JWK from node")
}

/// Writes a provider key file holding `keys`, the first of which signs.
pub fn write_key_file(file: &Path, keys: &[serde_json::Value]) {
    let jwks = serde_json::json!({ "keys": keys });
    std::fs::write(file, jwks.to_string()).expect("write the provider's key file");
}

/// Reads the JWKs in a provider key file.
pub fn read_key_file(file: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(file).expect("read the provider's key file");
    let jwks: serde_json::Value = serde_json::from_str(&text).expect("json key file");
    jwks["keys"].as_array().expect("keys").clone()
}

/// base64url without padding, as JWS uses.
pub fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// `header.payload.signature` over the raw JSON texts given, so tests can
/// write what no encoder would (duplicate names, say).
pub fn sign_raw(header: &str, payload: &str, key: &EncodingKey, alg: Algorithm) -> String {
    let message = format!("{}.{}", b64(header), b64(payload));
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), key, alg).expect("sign");
    format!("{message}.{signature}")
}

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    i64::try_from(since.as_secs()).expect("a sane clock")
}

/// What Check answered, flattened for assertions.
#[derive(Debug)]
pub struct Checked {
    /// The HTTP status Envoy would send: 200 when allowed.
    pub status: u16,
    /// Headers of a denial, or headers set upstream when allowed.
    pub headers: HashMap<String, String>,
    /// Headers removed upstream when allowed.
    pub removed: Vec<String>,
    /// Query parameters removed upstream when allowed.
    pub removed_query: Vec<String>,
    /// The denial's body.
    pub body: String,
}

/// Calls Check on Gatehouse's gRPC port as Envoy would, without Envoy.
pub async fn check(port: u16, method: &str, path: &str, headers: &[(&str, &str)]) -> Checked {
    let mut map: HashMap<String, String> = headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), (*v).to_owned()))
        .collect();
    map.entry("x-request-id".to_owned())
        .or_insert_with(|| "forge-1".to_owned());

    let http = attribute_context::HttpRequest {
        id: "forge-1".to_owned(),
        method: method.to_owned(),
        path: path.to_owned(),
        headers: map,
        ..Default::default()
    };
    let request = CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(attribute_context::Request {
                http: Some(http),
                ..Default::default()
            }),
            ..Default::default()
        }),
    };

    let mut client = AuthorizationClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .expect("connect to gatehouse")
        .max_encoding_message_size(8 * 1024 * 1024);
    let response = client.check(request).await.expect("check").into_inner();

    let header_pairs =
        |options: &[envoy_types::pb::envoy::config::core::v3::HeaderValueOption]| {
            options
                .iter()
                .filter_map(|option| option.header.as_ref())
                .map(|h| (h.key.clone(), h.value.clone()))
                .collect::<HashMap<_, _>>()
        };

    match response.http_response {
        Some(HttpResponse::DeniedResponse(denied)) => Checked {
            status: denied
                .status
                .map(|s| u16::try_from(s.code).expect("http status"))
                .unwrap_or(403),
            headers: header_pairs(&denied.headers),
            removed: Vec::new(),
            removed_query: Vec::new(),
            body: denied.body,
        },
        Some(HttpResponse::OkResponse(ok)) => Checked {
            status: 200,
            headers: header_pairs(&ok.headers),
            removed: ok.headers_to_remove,
            removed_query: ok.query_parameters_to_remove,
            body: String::new(),
        },
        other => panic!("check answered without an allow or deny: {other:?}"),
    }
}

// === the provider's test controls ===

/// The resource whose tokens are opaque.
pub const OPAQUE_RESOURCE: &str = "https://opaque.gatehouse.test";

/// A client-credentials token for `resource`.
pub async fn token_for(port: u16, client: (&str, &str), scope: &str, resource: &str) -> String {
    let response = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/token"))
        .basic_auth(client.0, Some(client.1))
        .form(&[
            ("grant_type", "client_credentials"),
            ("resource", resource),
            ("scope", scope),
        ])
        .send()
        .await
        .expect("token request");
    assert!(
        response.status().is_success(),
        "token: {}",
        response.status()
    );

    let body: serde_json::Value = response.json().await.expect("token json");
    body["access_token"]
        .as_str()
        .expect("access_token")
        .to_owned()
}

/// Revokes `token` as the client it was issued to (RFC 7009).
pub async fn revoke(port: u16, client: (&str, &str), token: &str) {
    let response = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/token/revocation"))
        .basic_auth(client.0, Some(client.1))
        .form(&[("token", token), ("token_type_hint", "access_token")])
        .send()
        .await
        .expect("revocation request");
    assert!(
        response.status().is_success(),
        "revoke: {}",
        response.status()
    );
}

/// The provider's counters: `jwks` and `introspection` calls so far.
pub async fn provider_stats(port: u16) -> serde_json::Value {
    reqwest::get(format!("http://127.0.0.1:{port}/__stats"))
        .await
        .expect("provider stats")
        .json()
        .await
        .expect("stats json")
}

/// Gatehouse's counters from the admin API on `admin_port`, by name.
pub async fn gatehouse_counters(admin_port: u16) -> HashMap<String, u64> {
    use gatehouse::grpc::pb::GetCountersRequest;
    use gatehouse::grpc::pb::admin_client::AdminClient;

    let address = format!("http://127.0.0.1:{admin_port}");
    let mut admin = AdminClient::connect(address).await.expect("admin api");
    let reply = admin
        .get_counters(GetCountersRequest {})
        .await
        .expect("counters");
    reply.into_inner().values
}

/// Posts to one of the provider's test controls (`/__delay?ms=N`, say).
pub async fn provider_control(port: u16, path_and_query: &str) {
    let response = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}{path_and_query}"))
        .send()
        .await
        .expect("provider control");
    assert!(response.status().is_success(), "{path_and_query}");
}

// === a Gatehouse with its own provider ===

/// A provider and a Gatehouse (no Envoy, no Redis) with a config of the
/// test's own, for tests that restart or stop the provider.
pub struct Gate {
    /// Gatehouse.
    pub gatehouse: super::Proc,
    /// The provider, while it runs.
    pub provider: Option<super::Proc>,
    /// Gatehouse's ports.
    pub ports: super::GatehousePorts,
    /// The provider's port, the same across restarts.
    pub provider_port: u16,
    /// The provider's key file.
    pub keys: std::path::PathBuf,
    /// Logs, keys and config.
    pub dir: super::Scratch,
}

impl Gate {
    /// Starts a provider (unless `provider_up` is false) and a Gatehouse
    /// serving `config`, in which `${GATEHOUSE_ISSUER}` names the provider.
    pub fn start(config: &str, provider_up: bool) -> Self {
        let dir = super::Scratch::new("gate");
        let keys = dir.path().join("keys.json");
        let provider_port = super::free_port();
        let provider =
            provider_up.then(|| super::provider(dir.path(), &keys, Some(provider_port)).0);

        let path = dir.path().join("gatehouse.yaml");
        std::fs::write(&path, config).expect("write the config");
        let ports = super::GatehousePorts {
            grpc: super::free_port(),
            admin: super::free_port(),
        };
        let env = super::gatehouse_env(ports, provider_port, super::free_port());
        let (gatehouse, ports) = super::gatehouse(dir.path(), &path, &env, false);

        Self {
            gatehouse,
            provider,
            ports,
            provider_port,
            keys,
            dir,
        }
    }

    /// Stops the provider.
    pub fn stop_provider(&mut self) {
        drop(self.provider.take());
    }

    /// (Re)starts the provider on its port with the current key file.
    pub fn start_provider(&mut self) {
        self.stop_provider();
        let (proc, _) = super::provider(self.dir.path(), &self.keys, Some(self.provider_port));
        self.provider = Some(proc);
    }

    /// (Re)starts the provider with `Cache-Control: max-age` on its JWKS.
    pub fn start_provider_with_max_age(&mut self, seconds: u64) {
        self.stop_provider();
        let script = super::root().join("tests/provider/provider.mjs");
        let args = [
            script.display().to_string(),
            "--port".to_owned(),
            self.provider_port.to_string(),
            "--keys".to_owned(),
            self.keys.display().to_string(),
            "--jwks-max-age".to_owned(),
            seconds.to_string(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let node = std::path::Path::new("node");
        let mut proc = super::Proc::start("provider", self.dir.path(), node, &args, &[]);
        proc.wait_for_log("provider ready");
        self.provider = Some(proc);
    }

    /// Check on `path` with `token` as a bearer token.
    pub async fn check(&self, path: &str, token: &str) -> Checked {
        let auth = format!("Bearer {token}");
        check(self.ports.grpc, "GET", path, &[("authorization", &auth)]).await
    }

    /// The overall gRPC health status (`ServingStatus` as a number), or
    /// `None` when health cannot be asked.
    pub async fn health(&self) -> Option<i32> {
        use tonic_health::pb::HealthCheckRequest;
        use tonic_health::pb::health_client::HealthClient;

        let url = format!("http://127.0.0.1:{}", self.ports.grpc);
        let channel = tonic::transport::Channel::from_shared(url)
            .ok()?
            .connect()
            .await
            .ok()?;
        let request = HealthCheckRequest {
            service: String::new(),
        };
        let response = HealthClient::new(channel).check(request).await.ok()?;
        Some(response.into_inner().status)
    }

    /// Waits until health reports `want`.
    pub async fn wait_for_health(
        &self,
        want: tonic_health::pb::health_check_response::ServingStatus,
    ) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while self.health().await != Some(want as i32) {
            assert!(
                std::time::Instant::now() < deadline,
                "health never {want:?}; last {:?}",
                self.health().await
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// Rewrites the config file with `config` and reloads it through the
    /// admin API; returns whether the file changed.
    pub async fn reload(&self, config: &str) -> bool {
        use gatehouse::grpc::pb::ReloadRequest;
        use gatehouse::grpc::pb::admin_client::AdminClient;

        std::fs::write(self.dir.path().join("gatehouse.yaml"), config).expect("rewrite config");
        let address = format!("http://127.0.0.1:{}", self.ports.admin);
        let mut admin = AdminClient::connect(address).await.expect("admin api");
        let reply = admin.reload(ReloadRequest {}).await.expect("reload");
        reply.into_inner().changed
    }

    /// Waits until Check on `path` with `token` answers `status`.
    pub async fn wait_for_status(&self, path: &str, token: &str, status: u16) -> Checked {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let checked = self.check(path, token).await;
            if checked.status == status {
                return checked;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "never got {status}; last answer {} {}",
                checked.status,
                checked.body
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
}

/// The error description of a denial's JSON body.
pub fn description(checked: &Checked) -> String {
    let body: serde_json::Value = serde_json::from_str(&checked.body).unwrap_or_default();
    body["error_description"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Signs claims like the provider's for `demo-web` with `key`, as `kid`.
pub fn sign_like_provider(issuer: &str, key: &SigningKey, kid: &str) -> String {
    let header = serde_json::json!({ "alg": "RS256", "typ": "at+jwt", "kid": kid });
    let claims = serde_json::json!({
        "iss": issuer,
        "aud": super::API_RESOURCE,
        "sub": "demo-web",
        "client_id": "demo-web",
        "scope": "vehicles:read stations:read",
        "iat": now(),
        "exp": now() + 300,
    });
    sign_raw(
        &header.to_string(),
        &claims.to_string(),
        &key.encoding(),
        Algorithm::RS256,
    )
}

/// Signs `claims` as RS256 with `key`, naming its `kid`.
pub fn sign_claims(key: &SigningKey, claims: &serde_json::Value) -> String {
    let header = serde_json::json!({ "alg": "RS256", "typ": "at+jwt", "kid": key.kid });
    sign_raw(
        &header.to_string(),
        &claims.to_string(),
        &key.encoding(),
        Algorithm::RS256,
    )
}
