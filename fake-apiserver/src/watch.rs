//! The body of a WATCH response: newline-delimited JSON events, streamed with chunked
//! transfer encoding, until `timeoutSeconds` elapse, a final event (`410 Expired`) is sent,
//! or the server drops the connection.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;
use tokio::time::Sleep;

use crate::lock;
use crate::store::{FRAME_SIZE, Store, WatchMsg, WatchStart};

/// Deregisters a watch from the store when its body is dropped (the stream ended or the
/// client went away).
struct WatchGuard {
    store: Weak<Mutex<Store>>,
    id: u64,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        if let Some(store) = self.store.upgrade() {
            lock(&store).remove_watcher(self.id);
        }
    }
}

/// A streaming watch response body.
pub(crate) struct WatchBody {
    rx: mpsc::UnboundedReceiver<WatchMsg>,
    deadline: Pin<Box<Sleep>>,
    done: bool,
    _guard: Option<WatchGuard>,
}

impl WatchBody {
    /// A body streaming the lines of `start`, ending after `timeout`.
    pub(crate) fn new(start: WatchStart, store: Weak<Mutex<Store>>, timeout: Duration) -> Self {
        WatchBody {
            rx: start.rx,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            done: false,
            _guard: start.id.map(|id| WatchGuard { store, id }),
        }
    }
}

impl Body for WatchBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
            // `timeoutSeconds` elapsed: end the response cleanly, as the API server does.
            this.done = true;
            return Poll::Ready(None);
        }
        let first = match this.rx.poll_recv(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => {
                this.done = true;
                return Poll::Ready(None);
            }
            Poll::Ready(Some(msg)) => msg,
        };
        let mut data = match first {
            WatchMsg::Last(b) => {
                this.done = true;
                return Poll::Ready(Some(Ok(Frame::data(b))));
            }
            WatchMsg::Data(b) => b,
        };
        // Coalesce whatever else is already queued into one frame.
        let mut buf: Option<BytesMut> = None;
        while !this.done && buf.as_ref().map_or(data.len(), BytesMut::len) < FRAME_SIZE {
            let next = match this.rx.try_recv() {
                Ok(WatchMsg::Data(b)) => b,
                Ok(WatchMsg::Last(b)) => {
                    this.done = true;
                    b
                }
                Err(_) => break,
            };
            buf.get_or_insert_with(|| BytesMut::from(&data[..]))
                .extend_from_slice(&next);
        }
        if let Some(buf) = buf {
            data = buf.freeze();
        }
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
