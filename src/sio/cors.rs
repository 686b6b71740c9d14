//! CORS for `/socket.io/`, as socket.io 2.x servers (the Sails stack) did by
//! default: any origin, with credentials. Browser pages served from another
//! origin use HTTP long-polling (socket.io-client 4.x starts with it) and
//! need these headers; WebSocket upgrades do not. Authentication is the JWT
//! in the virtual request, never a cookie, so reflecting the origin grants a
//! page nothing it could not do with its own token.
//!
//! The headers are tower-http's [`CorsLayer`]; this module only decides
//! which requests it sees: those for `/socket.io/` that carry an `Origin`.
//! The rest of the server (the HTTP API, `/ws`) answers no preflight and
//! sends no CORS header.

use std::convert::Infallible;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::extract::Request;
use axum::http::{Method, StatusCode, header};
use axum::response::Response;
use futures_util::future::{Either, MapOk, TryFutureExt};
use tower::{Layer, Service};
use tower_http::cors::{self, AllowHeaders, AllowOrigin, Cors, CorsLayer};

const PATH: &str = "/socket.io/";

/// The rules: the request's `Origin` reflected, with credentials; a
/// preflight allows GET, POST and OPTIONS and whichever headers it asks
/// for, and may be cached for a day. Responses vary by `Origin` only, the
/// one request header every answer depends on.
fn rules() -> CorsLayer {
    CorsLayer::new()
        .allow_origin(AllowOrigin::mirror_request())
        .allow_credentials(true)
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        .allow_headers(AllowHeaders::mirror_request())
        .max_age(Duration::from_secs(86_400))
        .vary([header::ORIGIN])
}

/// Puts the CORS `rules` in front of `/socket.io/` requests that have an
/// `Origin`; every other request reaches the inner service untouched. The
/// CORS service is built once, with the router, not per request.
#[derive(Clone, Copy, Debug, Default)]
pub struct SocketIoCors;

impl<S: Clone> Layer<S> for SocketIoCors {
    type Service = SocketIoCorsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SocketIoCorsService {
            cors: rules().layer(inner.clone()),
            plain: inner,
        }
    }
}

/// See [`SocketIoCors`].
#[derive(Clone, Debug)]
pub struct SocketIoCorsService<S> {
    plain: S,
    cors: Cors<S>,
}

/// What is done to a CORS answer before it leaves (see `call`).
type Finish = fn(Response) -> Response;

impl<S> Service<Request> for SocketIoCorsService<S>
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
        if !req.uri().path().starts_with(PATH) || !req.headers().contains_key(header::ORIGIN) {
            return Either::Left(self.plain.call(req));
        }
        // tower-http answers an OPTIONS itself, as a preflight, with 200
        // and no body; `/socket.io/` answers preflights 204 No Content,
        // which says exactly that (and is what clients have been seeing).
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
