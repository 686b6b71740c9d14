//! CORS for `/socket.io/` and the HTTP API (`/api/`), for the origins in
//! `allowed_origins` (with `*`, the default, any origin, with credentials,
//! as socket.io 2.x servers, the Sails stack, did). Browser pages served
//! from another origin use HTTP long-polling (socket.io-client 4.x starts
//! with it) and need these headers to read the answers, as does a page that
//! calls the API; WebSocket upgrades do not. Authentication is a JWT (or
//! the API key) the page sends itself, never a cookie, so reflecting an
//! allowed origin grants a page nothing it could not do with its own token.
//!
//! A page of an origin that is not allowed gets no CORS header (its browser
//! then hides the answer); refusing the request itself, 403, is the front
//! ends' job (see `gateway::admission`). A page pulso serves itself (its
//! origin names the request's `Host`) is always allowed.
//!
//! The headers are tower-http's [`CorsLayer`]; this module only decides
//! which requests it sees: those for `/socket.io/` and `/api/` that carry
//! an `Origin`. The rest of the server (`/ws`, `/metrics`, the health
//! checks, the console) answers no preflight and sends no CORS header.

use std::convert::Infallible;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::extract::Request;
use axum::http::{Method, StatusCode, header};
use axum::response::Response;
use futures_util::future::{Either, MapOk, TryFutureExt};
use tower::{Layer, Service};
use tower_http::cors::{self, AllowHeaders, AllowOrigin, Cors, CorsLayer};

use crate::config::AllowedOrigins;

/// The paths CORS applies to.
const PATHS: [&str; 2] = ["/socket.io/", "/api/"];

/// The rules: the request's `Origin` reflected when allowed, with
/// credentials; a preflight allows GET, POST and OPTIONS and whichever
/// headers it asks for, and may be cached for a day. Responses vary by
/// `Origin` only, the one request header every answer depends on.
fn rules(origins: AllowedOrigins) -> CorsLayer {
    CorsLayer::new()
        .allow_origin(AllowOrigin::predicate(move |origin, parts| {
            let host = parts.headers.get(header::HOST).map(|h| h.as_bytes());
            origins.allows(origin.as_bytes(), host)
        }))
        .allow_credentials(true)
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        .allow_headers(AllowHeaders::mirror_request())
        .max_age(Duration::from_secs(86_400))
        .vary([header::ORIGIN])
}

/// Puts the CORS `rules` in front of `/socket.io/` and `/api/` requests
/// that have an `Origin`; every other request reaches the inner service
/// untouched. The CORS service is built once, with the router, not per
/// request.
#[derive(Clone, Debug)]
pub struct CorsFor {
    origins: AllowedOrigins,
}

impl CorsFor {
    pub fn new(origins: AllowedOrigins) -> Self {
        CorsFor { origins }
    }
}

impl<S: Clone> Layer<S> for CorsFor {
    type Service = CorsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CorsService {
            cors: rules(self.origins.clone()).layer(inner.clone()),
            plain: inner,
        }
    }
}

/// See [`CorsFor`].
#[derive(Clone, Debug)]
pub struct CorsService<S> {
    plain: S,
    cors: Cors<S>,
}

/// What is done to a CORS answer before it leaves (see `call`).
type Finish = fn(Response) -> Response;

impl<S> Service<Request> for CorsService<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<S::Future, MapOk<cors::ResponseFuture<S::Future>, Finish>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Either path may take the next request. Both wrap clones of the
        // router's route, which is always ready and reserves nothing.
        ready!(self.plain.poll_ready(cx))?;
        self.cors.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let path = req.uri().path();
        if !PATHS.iter().any(|p| path.starts_with(p)) || !req.headers().contains_key(header::ORIGIN)
        {
            return Either::Left(self.plain.call(req));
        }
        // tower-http answers an OPTIONS itself, as a preflight, with 200
        // and no body; preflights are answered 204 No Content, which says
        // exactly that (and is what `/socket.io/` clients have been seeing).
        let finish: Finish = if req.method() == Method::OPTIONS {
            no_content
        } else {
            std::convert::identity
        };
        Either::Right(self.cors.call(req).map_ok(finish))
    }
}

fn no_content(mut response: Response) -> Response {
    *response.status_mut() = StatusCode::NO_CONTENT;
    response
}
