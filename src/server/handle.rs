//! [`Handle`]: publishing from Rust code, and stopping.

use std::future::Future;
use std::sync::Arc;

use serde::Serialize;
use serde_json::value::RawValue;

use crate::gateway::Gateway;
use crate::hub::now_ms;
use crate::topic::validate_name;

/// Most rooms one [`Handle::broadcast`] may name (as many as one
/// `POST /api/broadcast`).
pub const MAX_ROOMS: usize = crate::api::publish::MAX_ROOMS;

/// Publishes into a running [`Server`](crate::Server) from Rust code, and
/// stops it. Cheap to clone; every clone is the same server.
///
/// A message published here goes where one from `POST /api/publish` goes:
/// to every `/ws` subscriber of the topic (or of a matching wildcard
/// filter) and every Socket.IO socket in the room of that name, on this
/// node and, in a cluster, on every node. It is held to the same limits:
/// valid names, at most [`MAX_ROOMS`] rooms, a payload of at most
/// `api.max_body` once serialized.
#[derive(Clone)]
pub struct Handle {
    gw: Arc<Gateway>,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("node_id", &self.gw.config.node_id)
            .finish_non_exhaustive()
    }
}

/// Why a publish from Rust code was refused; nothing was sent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// A topic, room or event name is empty, longer than 256 bytes or has a
    /// control character.
    #[error("`{name}` is not a valid name: {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// [`Handle::broadcast`] with no room, or more than [`MAX_ROOMS`].
    #[error("a broadcast names 1 to {MAX_ROOMS} rooms, not {0}")]
    RoomCount(usize),
    /// The payload could not be serialized to JSON.
    #[error("the payload is not serializable to JSON: {0}")]
    Payload(#[from] serde_json::Error),
    /// The serialized payload is larger than `api.max_body`.
    #[error("the payload is {size} bytes, more than api.max_body ({max})")]
    TooLarge {
        /// Its size in bytes, serialized.
        size: usize,
        /// `api.max_body`.
        max: usize,
    },
}

impl Handle {
    pub(super) fn new(gw: Arc<Gateway>) -> Handle {
        Handle { gw }
    }

    /// Publishes `payload` (anything `serde` serializes to JSON) on
    /// `topic`; Socket.IO sockets in the room `topic` receive it as the
    /// event `message`.
    ///
    /// Returns how many connections of this node it reached, each counted
    /// once (as `{"recipients": n}` from the HTTP API); in a cluster other
    /// nodes' connections are reached too and not counted
    /// ([`Handle::clustered`]).
    pub fn publish<T: Serialize + ?Sized>(
        &self,
        topic: &str,
        payload: &T,
    ) -> Result<usize, PublishError> {
        self.broadcast(&[topic], None, payload)
    }

    /// Publishes `payload` to several rooms (topics) at once: a connection
    /// in several of them gets it once. Socket.IO sockets receive it as
    /// `event` (`message` when `None`); `/ws` clients see `event` in the
    /// message. Returns how many connections of this node it reached, as
    /// [`Handle::publish`] does.
    pub fn broadcast<R: AsRef<str>, T: Serialize + ?Sized>(
        &self,
        rooms: &[R],
        event: Option<&str>,
        payload: &T,
    ) -> Result<usize, PublishError> {
        if rooms.is_empty() || rooms.len() > MAX_ROOMS {
            return Err(PublishError::RoomCount(rooms.len()));
        }
        let rooms = rooms
            .iter()
            .map(|room| name(room.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        let event = event.map(name).transpose()?;
        let payload: Arc<RawValue> = serde_json::value::to_raw_value(payload)?.into();
        let max = self.gw.config.api_max_body;
        if payload.get().len() > max {
            return Err(PublishError::TooLarge {
                size: payload.get().len(),
                max,
            });
        }
        self.gw.metrics.published_from("library");
        Ok(self.gw.hub.publish_rooms(&rooms, event, payload, now_ms()))
    }

    /// Whether this node is part of a cluster (`cluster.redis_url` or
    /// `cluster.nats_url`): then a publish reaches other nodes'
    /// connections too, and the counts count only this node's.
    pub fn clustered(&self) -> bool {
        self.gw.hub.clustered()
    }

    /// This node's name (`node_id`).
    pub fn node_id(&self) -> &str {
        &self.gw.config.node_id
    }

    /// Starts the graceful stop: [`Server::run`](crate::Server::run) closes
    /// every connection and returns within `shutdown_timeout`. Calling it
    /// again does nothing.
    pub fn shutdown(&self) {
        self.gw.shutdown.cancel();
    }

    /// Whether the stop has started.
    pub fn is_stopping(&self) -> bool {
        self.gw.shutdown.is_cancelled()
    }

    /// Completes once the stop has started (at once if it has): the
    /// signal for an application's own HTTP server to stop too, as in
    /// `axum::serve(…).with_graceful_shutdown(handle.stopping())`.
    pub fn stopping(&self) -> impl Future<Output = ()> + Send + 'static {
        self.gw.shutdown.clone().cancelled_owned()
    }

    /// The gateway every front end shares.
    #[doc(hidden)]
    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gw
    }
}

/// A topic, room or event name, checked as the HTTP API checks it.
fn name(text: &str) -> Result<Arc<str>, PublishError> {
    validate_name(text).map_err(|reason| PublishError::InvalidName {
        name: text.chars().take(300).collect(),
        reason,
    })?;
    Ok(Arc::from(text))
}
