//! CORS for `/socket.io/`, as socket.io 2.x servers (the Sails stack) did by
//! default: any origin, with credentials. Browser pages served from another
//! origin use HTTP long-polling (socket.io-client 4.x starts with it) and
//! need these headers; WebSocket upgrades do not. Authentication is the JWT
//! in the virtual request, never a cookie, so reflecting the origin grants a
//! page nothing it could not do with its own token.

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

const PATH: &str = "/socket.io/";

fn allow(headers: &mut HeaderMap, origin: &HeaderValue) {
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
        HeaderValue::from_static("true"),
    );
    headers.append(header::VARY, HeaderValue::from_static("Origin"));
}

pub async fn cors(req: Request, next: Next) -> Response {
    let origin = req.headers().get(header::ORIGIN).cloned();
    let (Some(origin), true) = (origin, req.uri().path().starts_with(PATH)) else {
        return next.run(req).await;
    };
    if req.method() == Method::OPTIONS {
        let mut resp = StatusCode::NO_CONTENT.into_response();
        let h = resp.headers_mut();
        allow(h, &origin);
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        if let Some(asked) = req.headers().get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
            h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
        }
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("86400"),
        );
        return resp;
    }
    let mut resp = next.run(req).await;
    allow(resp.headers_mut(), &origin);
    resp
}
