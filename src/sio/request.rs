//! Sails-style virtual requests (`get`/`post` events with an ack) and their
//! acknowledgements, SPEC §4.
//!
//! A request is accepted in every shape the existing clients send:
//! `{url, params}`, `{url, data}` (sails.io.js), `{url, headers}`,
//! `{url, header}` and `{header: {url?, …}, body: {…}}`. The token is the
//! `jwt-api-key` found in any of them; the other fields are the request
//! parameters room templates may use.

use serde_json::{Map, Value, json};

use crate::auth::AuthError;

/// The parameter carrying the JWT.
pub const TOKEN_KEY: &str = "jwt-api-key";

/// Where parameters may be, in precedence order (first wins).
const CONTAINERS: [&str; 5] = ["params", "data", "body", "header", "headers"];

/// An error acknowledgement: `{"body":{"error":{code,message}},"statusCode"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl Failure {
    fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Failure {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn malformed(message: impl Into<String>) -> Self {
        Self::new(400, "400-1", message)
    }

    pub fn missing_token() -> Self {
        Self::new(401, "401-1", "authentication required: send `jwt-api-key`")
    }

    pub fn invalid_token(message: impl Into<String>) -> Self {
        Self::new(401, "401-2", message)
    }

    pub fn forbidden_role(role: &str) -> Self {
        Self::new(403, "403-1", format!("role `{role}` may not connect here"))
    }

    pub fn unknown_url(message: impl Into<String>) -> Self {
        Self::new(404, "404-1", message)
    }

    /// More packets than `ws.rate_limit` allows (pulso's own WebSocket
    /// transport only).
    pub fn rate_limited() -> Self {
        Self::new(429, "429-1", "too many messages; slow down")
    }

    /// A forwarded request's body over `socketio.proxy_max_body`.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(413, "413-1", message)
    }

    /// More forwarded requests in flight on this connection than
    /// `socketio.proxy_socket_concurrency`.
    pub fn proxy_socket_busy() -> Self {
        Self::new(
            429,
            "429-2",
            "too many requests in flight on this connection; wait for an answer",
        )
    }

    /// More forwarded requests in flight on this node than
    /// `socketio.proxy_concurrency`.
    pub fn proxy_busy() -> Self {
        Self::new(503, "503-1", "the server is busy; try again")
    }

    /// The backend could not be reached, or broke off its answer.
    pub fn bad_gateway(message: impl Into<String>) -> Self {
        Self::new(502, "502-1", message)
    }

    /// The backend's answer is over `socketio.proxy_max_body`.
    pub fn answer_too_large(message: impl Into<String>) -> Self {
        Self::new(502, "502-2", message)
    }

    /// The backend did not answer within `socketio.proxy_timeout`.
    pub fn gateway_timeout(message: impl Into<String>) -> Self {
        Self::new(504, "504-1", message)
    }

    pub fn ack(&self) -> Value {
        json!({
            "body": {"error": {"code": self.code, "message": self.message}},
            "statusCode": self.status,
        })
    }
}

impl From<AuthError> for Failure {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Missing => Failure::missing_token(),
            AuthError::Expired => Failure::new(401, "401-3", e.to_string()),
            AuthError::NotYetValid | AuthError::Invalid(_) => Failure::invalid_token(e.to_string()),
        }
    }
}

/// The success acknowledgement.
pub fn success(socket_id: &str, rooms: &[String]) -> Value {
    json!({"body": {"socketId": socket_id, "rooms": rooms}, "statusCode": 200})
}

/// The token as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token {
    Missing,
    Text(String),
    /// Present but not a string (a number, an object…).
    WrongType,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VirtualRequest {
    /// The url's path: no query string, no trailing `/`.
    pub path: String,
    pub token: Token,
    /// Every parameter (token included), first container wins.
    pub params: Map<String, Value>,
}

/// Longest url a virtual request may name.
pub const MAX_URL: usize = 2048;

/// A request's url: its top-level `url`, else `header.url`.
pub fn url_of(obj: &Map<String, Value>) -> Result<&str, Failure> {
    let header_url = match obj.get("header") {
        Some(Value::Object(h)) => h.get("url"),
        _ => None,
    };
    match obj.get("url").or(header_url) {
        Some(Value::String(u)) if !u.is_empty() && u.len() <= MAX_URL => Ok(u.as_str()),
        Some(_) => Err(Failure::malformed("`url` must be a non-empty string")),
        None => Err(Failure::malformed("the request has no `url`")),
    }
}

/// A url's path: no query string or fragment, no trailing `/`.
pub fn path_of(url: &str) -> &str {
    let path = url.split(['?', '#']).next().unwrap_or_default();
    match path.trim_end_matches('/') {
        "" => "/",
        p => p,
    }
}

/// Whether a request names a url other than `own` (the notifications
/// url): what `socketio.proxy_url` forwards. A request without a valid
/// url is not.
pub fn names_other_url(v: &Value, own: &str) -> bool {
    match v {
        Value::Object(obj) => url_of(obj).is_ok_and(|u| path_of(u) != own),
        _ => false,
    }
}

/// Reads a virtual request. Only its shape is checked here.
pub fn parse(v: &Value) -> Result<VirtualRequest, Failure> {
    let Value::Object(obj) = v else {
        return Err(Failure::malformed(
            "the request must be an object such as {url: '/notifications', params: {...}}",
        ));
    };
    let url = url_of(obj)?;
    let query = url
        .split('#')
        .next()
        .and_then(|u| u.split_once('?'))
        .map(|(_, q)| q);
    let path = path_of(url);

    let mut params = Map::new();
    for key in CONTAINERS {
        match obj.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::Object(fields)) => {
                for (k, v) in fields {
                    if !params.contains_key(k) {
                        params.insert(k.clone(), v.clone());
                    }
                }
            }
            Some(_) => {
                return Err(Failure::malformed(format!("`{key}` must be an object")));
            }
        }
    }
    // Query-string parameters of the url come last.
    if let Some(q) = query
        && let Ok(pairs) = serde_urlencoded::from_str::<Vec<(String, String)>>(q)
    {
        for (k, v) in pairs {
            params.entry(k).or_insert(Value::String(v));
        }
    }
    let token = match params.get(TOKEN_KEY) {
        None | Some(Value::Null) => Token::Missing,
        Some(Value::String(s)) if s.trim().is_empty() => Token::Missing,
        Some(Value::String(s)) => Token::Text(s.clone()),
        Some(_) => Token::WrongType,
    };
    Ok(VirtualRequest {
        path: path.to_string(),
        token,
        params,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok(v: Value) -> Token {
        parse(&v).unwrap().token
    }

    #[test]
    fn every_documented_shape_carries_the_token() {
        let t = || Token::Text("T".into());
        assert_eq!(tok(json!({"url":"/n","params":{"jwt-api-key":"T"}})), t());
        assert_eq!(tok(json!({"url":"/n","data":{"jwt-api-key":"T"}})), t());
        assert_eq!(tok(json!({"url":"/n","headers":{"jwt-api-key":"T"}})), t());
        assert_eq!(tok(json!({"url":"/n","header":{"jwt-api-key":"T"}})), t());
        let r = parse(&json!({"header":{"url":"/n/","jwt-api-key":"T"},"body":{"tournamentId":2}}))
            .unwrap();
        assert_eq!(r.token, t());
        assert_eq!(r.path, "/n");
        assert_eq!(r.params["tournamentId"], json!(2));
        // sails.io.js: {method, headers, data, url}
        let r = parse(&json!({"method":"get","headers":{},"data":{"jwt-api-key":"T","tournamentId":"4"},"url":"/n?x=1"})).unwrap();
        assert_eq!(r.token, t());
        assert_eq!(r.path, "/n");
        assert_eq!(r.params["x"], json!("1"));
    }

    #[test]
    fn malformed_requests() {
        for bad in [
            json!(null),
            json!("get"),
            json!(3),
            json!([1]),
            json!({}),
            json!({"url": 5}),
            json!({"url": ""}),
            json!({"url":"/n","params":"x"}),
            json!({"url":"/n","data":[1]}),
        ] {
            assert_eq!(parse(&bad).unwrap_err().code, "400-1", "{bad}");
        }
    }

    #[test]
    fn token_kinds() {
        assert_eq!(tok(json!({"url":"/n"})), Token::Missing);
        assert_eq!(
            tok(json!({"url":"/n","params":{"jwt-api-key":""}})),
            Token::Missing
        );
        assert_eq!(
            tok(json!({"url":"/n","params":{"jwt-api-key":5}})),
            Token::WrongType
        );
        assert_eq!(
            tok(json!({"url":"/n","params":{"jwt-api-key":{"a":1}}})),
            Token::WrongType
        );
    }

    #[test]
    fn ack_shapes() {
        assert_eq!(
            Failure::from(AuthError::Expired).ack(),
            json!({"body":{"error":{"code":"401-3","message":"the token has expired"}},"statusCode":401})
        );
        assert_eq!(
            success("s", &["a".into()]),
            json!({"body":{"socketId":"s","rooms":["a"]},"statusCode":200})
        );
    }
}
