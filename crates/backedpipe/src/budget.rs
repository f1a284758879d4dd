//! The pipe's and the session's share of tokio's cooperative scheduling budget: one unit per
//! application read or write, charged by the pipe or session itself, whatever its transport
//! charges.
//!
//! A task that reads or writes a pipe that is always ready (bytes buffered, room in a buffer
//! with no transport under it) must still yield now and then, so the raw pipe's reader and
//! writer and the session's application reads and writes spend the budget
//! (`tokio::task::coop::poll_proceed`) as tokio's own sockets do. A tokio socket underneath spends it too, and counted twice the budget ran out
//! after 64 operations instead of 128: raw-mode throughput pinned to one CPU then had the
//! runtime's two workers trade the writer and reader tasks between them 3,500-5,000 times per
//! GiB (voluntary context switches; raw TCP about 150), each a sleep in `epoll_wait`. So the
//! transport is polled with its budget unconstrained ([`poll_transport`]), and the pipe's own
//! unit is the only one spent. A session's driver task spends nothing here: it is its own
//! task, and yields by itself after a fixed number of turns.

use std::future::{poll_fn, Future};
use std::pin::pin;
use std::task::{Context, Poll};

/// Polls a transport once, through `poll`, without letting it spend the task's budget (the
/// caller has spent the pipe's unit for this operation).
pub(crate) fn poll_transport<T>(
    cx: &mut Context<'_>,
    poll: impl FnOnce(&mut Context<'_>) -> Poll<T>,
) -> Poll<T> {
    let mut poll = Some(poll);
    let once = poll_fn(move |cx| match poll.take() {
        Some(poll) => poll(cx),
        None => Poll::Pending,
    });
    pin!(tokio::task::unconstrained(once)).poll(cx)
}
