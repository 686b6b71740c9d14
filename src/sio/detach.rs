//! Copies a `/socket.io/` request's URI and header values out of hyper's
//! read buffer before socketioxide sees the request.
//!
//! hyper parses header values and the URI as slices of the connection's
//! read buffer (8 KiB or more), axum's router copies the URI into an
//! `OriginalUri` extension, and engineioxide keeps the request's parts for
//! the whole life of a WebSocket session, so every idle Socket.IO
//! connection kept that buffer alive: about 16 KB of its ~30 KB (measured
//! with `valgrind --tool=dhat`). Owned copies are a few hundred bytes.

use axum::extract::{OriginalUri, Request};
use axum::http::{HeaderMap, HeaderValue, Uri};
use axum::middleware::Next;
use axum::response::Response;

pub async fn detach(mut req: Request, next: Next) -> Response {
    if req.uri().path().starts_with("/socket.io/") {
        own_parts(&mut req);
    }
    next.run(req).await
}

/// Replaces the header values, the URI and axum's `OriginalUri` with copies.
fn own_parts(req: &mut Request) {
    let headers = req
        .headers()
        .iter()
        .filter_map(|(name, value)| {
            // `from_bytes` copies; a value that was valid stays valid.
            let owned = HeaderValue::from_bytes(value.as_bytes()).ok()?;
            Some((name.clone(), owned))
        })
        .collect::<HeaderMap>();
    *req.headers_mut() = headers;
    if let Ok(uri) = Uri::try_from(req.uri().to_string()) {
        // axum's router keeps a copy of the URI in an extension too.
        if req.extensions().get::<OriginalUri>().is_some() {
            req.extensions_mut().insert(OriginalUri(uri.clone()));
        }
        *req.uri_mut() = uri;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use bytes::Bytes;

    #[test]
    fn nothing_refers_to_the_read_buffer_afterwards() {
        // What hyper does: every part is a slice of one buffer.
        let buffer = Bytes::from(b"/socket.io/?EIO=4&transport=websocket websocket".to_vec());
        let uri = Uri::from_maybe_shared(buffer.slice(0..37)).unwrap();
        let mut req = Request::new(Body::empty());
        *req.uri_mut() = uri.clone();
        req.extensions_mut().insert(OriginalUri(uri));
        let value = HeaderValue::from_maybe_shared(buffer.slice(38..)).unwrap();
        req.headers_mut().insert("upgrade", value);
        req.headers_mut()
            .append("x-many", HeaderValue::from_static("1"));
        req.headers_mut()
            .append("x-many", HeaderValue::from_static("2"));
        assert!(!buffer.is_unique());

        own_parts(&mut req);

        assert!(buffer.is_unique(), "a part still shares the read buffer");
        assert_eq!(req.uri(), "/socket.io/?EIO=4&transport=websocket");
        assert_eq!(
            req.extensions().get::<OriginalUri>().map(|u| &u.0),
            Some(req.uri())
        );
        assert_eq!(req.headers()["upgrade"], "websocket");
        assert_eq!(req.headers().get_all("x-many").iter().count(), 2);
    }
}
