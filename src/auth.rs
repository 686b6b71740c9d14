//! JWT verification (and signing, for `pulso token` and tests).
//!
//! HMAC tokens (HS256/384/512) use `jwt.secret`; RSA, EC and Ed25519 tokens
//! (RS*/PS*, ES256/384, EdDSA) use the PEM in `jwt.public_key_file`. Both may
//! be configured at once; the token header picks the key.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value};

use crate::config::{ConfigError, JwtConfig};

/// Who a connection is, from its token. Kept for the connection's whole life.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    /// `sub`, or `id` when there is no `sub` (numbers are used as text).
    pub sub: String,
    pub role: String,
    /// Every claim of the token (`email`, `name`, custom ones…).
    pub claims: Map<String, Value>,
    /// `exp`, in seconds since the epoch, when the token has one.
    pub exp: Option<u64>,
}

impl Identity {
    /// A claim as text: strings as they are, integers in decimal.
    pub fn claim_text(&self, name: &str) -> Option<String> {
        match self.claims.get(name)? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
            _ => None,
        }
    }
}

/// Why a token was refused. Each maps to one stable error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no token was given")]
    Missing,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("invalid token: {0}")]
    Invalid(String),
}

impl AuthError {
    /// The `/ws` and HTTP API error code.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => "unauthorized",
            AuthError::Expired => "token_expired",
            AuthError::NotYetValid | AuthError::Invalid(_) => "invalid_token",
        }
    }

    /// The `reason` label of the auth-failure metric.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::Invalid(_) => "invalid",
        }
    }
}

/// A key with the validation rules for its algorithm family (jsonwebtoken
/// refuses a `Validation` that lists algorithms of another family).
struct Key {
    key: DecodingKey,
    validation: Validation,
}

pub struct Verifier {
    hmac: Option<Key>,
    public: Option<Key>,
    leeway: Duration,
    /// `jwt.issuer` and `jwt.audience`, to say why a token was refused.
    issuer: Option<String>,
    audience: Option<String>,
}

/// Why a token was refused, before it becomes an [`AuthError`] (for a
/// client) or a sentence (for `pulso token --check`).
enum Failure {
    Missing,
    Header(jsonwebtoken::errors::Error),
    Algorithm(Algorithm),
    /// With the token's algorithm, which picked the key.
    Decode(jsonwebtoken::errors::Error, Algorithm),
    Claims(AuthError),
}

impl From<Failure> for AuthError {
    fn from(f: Failure) -> Self {
        use jsonwebtoken::errors::ErrorKind;
        match f {
            Failure::Missing => AuthError::Missing,
            Failure::Header(e) => AuthError::Invalid(e.to_string()),
            Failure::Algorithm(alg) => {
                AuthError::Invalid(format!("algorithm {alg:?} is not accepted"))
            }
            Failure::Decode(e, _) => match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                _ => AuthError::Invalid(e.to_string()),
            },
            Failure::Claims(e) => e,
        }
    }
}

/// A token as `pulso token --check` reports it.
pub struct Inspection {
    /// The header, when it can be read.
    pub header: Option<Header>,
    /// The claims as written in the token, read without verifying anything
    /// (`None` when the payload is not a JSON object in base64url).
    pub claims: Option<Map<String, Value>>,
    /// What the server would do: the identity, or the error a client would
    /// get and, in words, why.
    pub verdict: Result<Identity, (AuthError, String)>,
}

const HMAC_ALGS: [Algorithm; 3] = [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];

impl Verifier {
    /// Builds the verifier. `secret` must be resolved already (a generated one
    /// when none was configured), so an HMAC key always exists unless the
    /// deployment uses public keys only.
    pub fn new(cfg: &JwtConfig, secret: Option<&str>) -> Result<Self, ConfigError> {
        let hmac = secret.map(|s| Key {
            key: DecodingKey::from_secret(s.as_bytes()),
            validation: validation(cfg, HMAC_ALGS.to_vec()),
        });
        let public = match &cfg.public_key_file {
            None => None,
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    ConfigError(format!(
                        "invalid setting `jwt.public_key_file`: cannot read {}: {e}",
                        path.display()
                    ))
                })?;
                let (key, algs) = public_key(&pem).ok_or_else(|| {
                    ConfigError(format!(
                        "invalid setting `jwt.public_key_file`: {} is not an RSA, EC or Ed25519 public key in PEM",
                        path.display()
                    ))
                })?;
                Some(Key {
                    key,
                    validation: validation(cfg, algs),
                })
            }
        };
        Ok(Verifier {
            hmac,
            public,
            leeway: cfg.leeway,
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
        })
    }

    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        self.decode(token).map_err(AuthError::from)
    }

    fn decode(&self, token: &str) -> Result<Identity, Failure> {
        let token = token.trim();
        if token.is_empty() {
            return Err(Failure::Missing);
        }
        let header = jsonwebtoken::decode_header(token).map_err(Failure::Header)?;
        let key = if HMAC_ALGS.contains(&header.alg) {
            self.hmac.as_ref()
        } else {
            self.public
                .as_ref()
                .filter(|k| k.validation.algorithms.contains(&header.alg))
        }
        .ok_or(Failure::Algorithm(header.alg))?;

        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &key.validation)
            .map_err(|e| Failure::Decode(e, header.alg))?;
        identity(data.claims).map_err(Failure::Claims)
    }

    /// Verifies `token` as [`Verifier::verify`] does, and says why in words
    /// when it is refused (for operators: `pulso token --check`).
    pub fn inspect(&self, token: &str) -> Inspection {
        let token = token.trim();
        let header = jsonwebtoken::decode_header(token).ok();
        let claims = token
            .split('.')
            .nth(1)
            .and_then(|p| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(p.trim_end_matches('='))
                    .ok()
            })
            .and_then(|json| serde_json::from_slice::<Map<String, Value>>(&json).ok());
        let verdict = self.decode(token).map_err(|f| {
            let why = self.explain(&f, claims.as_ref());
            (AuthError::from(f), why)
        });
        Inspection {
            header,
            claims,
            verdict,
        }
    }

    fn explain(&self, failure: &Failure, claims: Option<&Map<String, Value>>) -> String {
        use jsonwebtoken::errors::ErrorKind;
        let claim = |name: &str| claims.and_then(|c| c.get(name));
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let accepted = |k: &Key| {
            k.validation
                .algorithms
                .iter()
                .map(|a| format!("{a:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match failure {
            Failure::Missing => "no token was given".into(),
            Failure::Header(e) => format!("malformed: the header cannot be read ({e})"),
            Failure::Algorithm(alg) if HMAC_ALGS.contains(alg) => format!(
                "wrong algorithm: signed with {alg:?} (HMAC), but no jwt.secret is configured"
            ),
            Failure::Algorithm(alg) => match &self.public {
                None => format!(
                    "wrong algorithm: signed with {alg:?}, but no jwt.public_key_file is configured{}",
                    if self.hmac.is_some() {
                        " (jwt.secret accepts HS256, HS384, HS512)"
                    } else {
                        ""
                    }
                ),
                Some(k) => format!(
                    "wrong algorithm: signed with {alg:?}; the key in jwt.public_key_file accepts {}",
                    accepted(k)
                ),
            },
            Failure::Decode(e, alg) => match e.kind() {
                ErrorKind::InvalidSignature if HMAC_ALGS.contains(alg) => format!(
                    "bad signature: this {alg:?} token was not signed with the configured jwt.secret"
                ),
                ErrorKind::InvalidSignature => format!(
                    "bad signature: this {alg:?} token was not signed with the private key of jwt.public_key_file"
                ),
                ErrorKind::ExpiredSignature => match claim("exp").and_then(Value::as_u64) {
                    Some(exp) => format!(
                        "expired {} ago (exp {exp}; jwt.leeway is {} s)",
                        span(now.saturating_sub(exp)),
                        self.leeway.as_secs()
                    ),
                    None => "expired".into(),
                },
                ErrorKind::ImmatureSignature => match claim("nbf").and_then(Value::as_u64) {
                    Some(nbf) => format!(
                        "not valid yet: valid in {} (nbf {nbf}; jwt.leeway is {} s)",
                        span(nbf.saturating_sub(now)),
                        self.leeway.as_secs()
                    ),
                    None => "not valid yet".into(),
                },
                ErrorKind::InvalidIssuer => format!(
                    "wrong issuer: iss is {}, jwt.issuer is {:?}",
                    claim("iss").map_or("missing".into(), Value::to_string),
                    self.issuer.as_deref().unwrap_or_default()
                ),
                ErrorKind::InvalidAudience => format!(
                    "wrong audience: aud is {}, jwt.audience is {:?}",
                    claim("aud").map_or("missing".into(), Value::to_string),
                    self.audience.as_deref().unwrap_or_default()
                ),
                ErrorKind::MissingRequiredClaim(c) => format!(
                    "the `{c}` claim is missing, and {} requires it",
                    match c.as_str() {
                        "exp" => "jwt.require_exp = true",
                        "iss" => "jwt.issuer",
                        "aud" => "jwt.audience",
                        _ => "the configuration",
                    }
                ),
                // The payload is a JSON object (it was read above), so
                // jsonwebtoken refused the type of a claim it checks.
                ErrorKind::Json(_) if claims.is_some() => format!(
                    "invalid claims: exp, nbf, iat, sub, iss or aud has the wrong type ({e})"
                ),
                ErrorKind::InvalidToken
                | ErrorKind::Base64(_)
                | ErrorKind::Json(_)
                | ErrorKind::Utf8(_) => format!("malformed: {e}"),
                _ => format!("invalid: {e}"),
            },
            Failure::Claims(e) => format!("invalid claims: {e}"),
        }
    }

    /// When a connection authenticated with this identity must be closed:
    /// `exp` plus the leeway.
    /// `None` also when `exp` is too far away to represent: never, in practice.
    pub fn deadline(&self, identity: &Identity) -> Option<SystemTime> {
        UNIX_EPOCH
            .checked_add(Duration::from_secs(identity.exp?))?
            .checked_add(self.leeway)
    }
}

/// A duration in words: `42 s`, `17 min`, `5 h`, `3 d`.
pub fn span(secs: u64) -> String {
    match secs {
        0..120 => format!("{secs} s"),
        120..7200 => format!("{} min", secs / 60),
        7200..172_800 => format!("{} h", secs / 3600),
        _ => format!("{} d", secs / 86_400),
    }
}

/// The instant, on tokio's clock, of a wall-clock deadline: now when it is
/// past, and at most a century ahead (so a token's absurd `exp` cannot
/// overflow the clock).
pub fn instant_of(at: SystemTime) -> tokio::time::Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 86400);
    let left = at
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO)
        .min(CENTURY);
    tokio::time::Instant::now() + left
}

fn validation(cfg: &JwtConfig, algorithms: Vec<Algorithm>) -> Validation {
    let mut v = Validation::new(algorithms[0]);
    v.algorithms = algorithms;
    v.leeway = cfg.leeway.as_secs();
    v.validate_exp = true;
    v.validate_nbf = true;
    v.set_required_spec_claims(if cfg.require_exp {
        &["exp"][..]
    } else {
        &[][..]
    });
    match &cfg.issuer {
        Some(iss) => v.set_issuer(&[iss]),
        None => v.iss = None,
    }
    match &cfg.audience {
        Some(aud) => v.set_audience(&[aud]),
        None => v.validate_aud = false,
    }
    v
}

fn identity(claims: Map<String, Value>) -> Result<Identity, AuthError> {
    let text = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    let sub = match claims.get("sub").or_else(|| claims.get("id")) {
        None => String::new(),
        Some(v) => text(v)
            .ok_or_else(|| AuthError::Invalid("`sub` must be a string or a number".into()))?,
    };
    let role = match claims.get("role") {
        None => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(AuthError::Invalid("`role` must be a string".into())),
    };
    let exp = claims.get("exp").and_then(Value::as_u64);
    Ok(Identity {
        sub,
        role,
        claims,
        exp,
    })
}

fn public_key(pem: &[u8]) -> Option<(DecodingKey, Vec<Algorithm>)> {
    use Algorithm::*;
    if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
        return Some((k, vec![RS256, RS384, RS512, PS256, PS384, PS512]));
    }
    if let Ok(k) = DecodingKey::from_ec_pem(pem) {
        return Some((k, vec![ES256, ES384]));
    }
    if let Ok(k) = DecodingKey::from_ed_pem(pem) {
        return Some((k, vec![EdDSA]));
    }
    None
}

/// Signs tokens: with the HMAC secret (HS256) or a PEM private key.
pub struct Signer {
    key: EncodingKey,
    alg: Algorithm,
}

impl Signer {
    pub fn hmac(secret: &str) -> Self {
        Signer {
            key: EncodingKey::from_secret(secret.as_bytes()),
            alg: Algorithm::HS256,
        }
    }

    /// An RSA (RS256), EC P-256 (ES256) or Ed25519 (EdDSA) private key.
    pub fn private_pem(pem: &[u8]) -> Option<Self> {
        if let Ok(key) = EncodingKey::from_rsa_pem(pem) {
            return Some(Signer {
                key,
                alg: Algorithm::RS256,
            });
        }
        if let Ok(key) = EncodingKey::from_ec_pem(pem) {
            return Some(Signer {
                key,
                alg: Algorithm::ES256,
            });
        }
        if let Ok(key) = EncodingKey::from_ed_pem(pem) {
            return Some(Signer {
                key,
                alg: Algorithm::EdDSA,
            });
        }
        None
    }

    pub fn with_alg(mut self, alg: Algorithm) -> Self {
        self.alg = alg;
        self
    }

    /// Signs a token for `role`/`sub` with extra claims, valid for `ttl` (none: no `exp`).
    pub fn token(
        &self,
        role: &str,
        sub: &str,
        ttl: Option<Duration>,
        extra: &Map<String, Value>,
    ) -> Result<String, String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut claims = extra.clone();
        claims.insert("sub".into(), sub.into());
        claims.insert("role".into(), role.into());
        claims.insert("iat".into(), now.into());
        if let Some(ttl) = ttl {
            claims.insert("exp".into(), (now + ttl.as_secs()).into());
        }
        self.sign(&claims)
    }

    pub fn sign(&self, claims: &Map<String, Value>) -> Result<String, String> {
        jsonwebtoken::encode(&Header::new(self.alg), claims, &self.key).map_err(|e| e.to_string())
    }
}

/// A random 256-bit secret, for when none is configured.
pub fn random_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn cfg() -> JwtConfig {
        Config::defaults().jwt
    }

    fn claims(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn hmac_round_trip_and_identity() {
        let v = Verifier::new(&cfg(), Some("s3cret")).unwrap();
        let t = Signer::hmac("s3cret")
            .token(
                "assistant",
                "42",
                Some(Duration::from_secs(60)),
                &claims(serde_json::json!({"email":"a@b"})),
            )
            .unwrap();
        let id = v.verify(&t).unwrap();
        assert_eq!((id.sub.as_str(), id.role.as_str()), ("42", "assistant"));
        assert_eq!(id.claim_text("email").as_deref(), Some("a@b"));
        assert!(id.exp.is_some());
        for alg in [Algorithm::HS384, Algorithm::HS512] {
            let t = Signer::hmac("s3cret")
                .with_alg(alg)
                .token("r", "1", None, &Map::new())
                .unwrap();
            assert!(v.verify(&t).is_ok());
        }
    }

    #[test]
    fn failures_have_codes() {
        let v = Verifier::new(&cfg(), Some("s3cret")).unwrap();
        assert_eq!(v.verify("").unwrap_err().code(), "unauthorized");
        assert_eq!(v.verify("garbage").unwrap_err().code(), "invalid_token");
        let other = Signer::hmac("other")
            .token("r", "1", None, &Map::new())
            .unwrap();
        assert_eq!(v.verify(&other).unwrap_err().code(), "invalid_token");
        let s = Signer::hmac("s3cret");
        let expired = s
            .sign(&claims(serde_json::json!({"sub":"1","exp":1000})))
            .unwrap();
        assert_eq!(v.verify(&expired).unwrap_err(), AuthError::Expired);
        let future = s
            .sign(&claims(
                serde_json::json!({"sub":"1","nbf":4_000_000_000u64}),
            ))
            .unwrap();
        assert_eq!(v.verify(&future).unwrap_err(), AuthError::NotYetValid);
        let id_only = s
            .sign(&claims(serde_json::json!({"id": 7, "role": "timer"})))
            .unwrap();
        assert_eq!(v.verify(&id_only).unwrap().sub, "7");
    }

    #[test]
    fn absurd_exp_does_not_overflow() {
        let v = Verifier::new(&cfg(), Some("k")).unwrap();
        let t = Signer::hmac("k")
            .sign(&claims(serde_json::json!({"sub":"1","exp": u64::MAX})))
            .unwrap();
        let id = v.verify(&t).unwrap();
        if let Some(at) = v.deadline(&id) {
            let _ = instant_of(at);
        }
        let _ = instant_of(UNIX_EPOCH + Duration::from_secs(1 << 40));
    }

    #[test]
    fn issuer_audience_require_exp_leeway() {
        let mut c = cfg();
        c.issuer = Some("me".into());
        c.audience = Some("pulso".into());
        c.require_exp = true;
        c.leeway = Duration::from_secs(3600);
        let v = Verifier::new(&c, Some("k")).unwrap();
        let s = Signer::hmac("k");
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let good = claims(serde_json::json!({"sub":"1","iss":"me","aud":"pulso","exp": now - 60}));
        assert!(v.verify(&s.sign(&good).unwrap()).is_ok(), "within leeway");
        let mut no_exp = good.clone();
        no_exp.remove("exp");
        assert!(v.verify(&s.sign(&no_exp).unwrap()).is_err());
        let mut bad_iss = good.clone();
        bad_iss.insert("iss".into(), "you".into());
        assert!(v.verify(&s.sign(&bad_iss).unwrap()).is_err());
        let mut bad_aud = good;
        bad_aud.insert("aud".into(), "else".into());
        assert!(v.verify(&s.sign(&bad_aud).unwrap()).is_err());
    }
}
