//! Which thread serves a new connection: the one with the fewest open connections.
//!
//! Each thread accepts from its own `SO_REUSEPORT` socket, and the kernel picks the socket by
//! a hash of the connection's addresses. That evens out over thousands of short connections,
//! not over the few long-lived ones a CI fleet's balancer or a load generator keeps open:
//! 8 connections land 4/4 only a quarter of the time, 6/2 or worse a fifth of the time, and
//! the thread with 6 then does three times the work of the other while its clients wait.
//! So a thread that accepts a connection while it holds more than another thread hands the
//! connection to the least busy one. Connections stay on one thread for their whole life
//! (see the module above for why), so this is the one chance to even the threads out.
//!
//! The choice is [`pick`], a pure function of the threads' counts, tested as a table below;
//! [`Balance`] holds the counts and the way into each thread.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use prometheus::IntGauge;
use tokio::sync::mpsc::UnboundedSender;

use super::accept::Handoff;
use crate::metrics;

/// The thread that should serve a connection thread `own` has just accepted, from each
/// thread's open connections (`None`: the thread takes no hand-offs, not started or stopped;
/// `own` always counts).
///
/// The accepting thread keeps the connection unless another thread holds fewer: a hand-off
/// costs a wake-up of the other thread, and an even split needs no more. Among the others,
/// ties go to the lowest index, so concurrent choices tend to agree.
pub fn pick(own: usize, open: impl IntoIterator<Item = Option<usize>>) -> usize {
    let mut mine = usize::MAX;
    let mut best: Option<(usize, usize)> = None;
    for (i, n) in open.into_iter().enumerate() {
        match n {
            _ if i == own => mine = n.unwrap_or(0),
            Some(n) if best.is_none_or(|(_, m)| n < m) => best = Some((i, n)),
            _ => {}
        }
    }
    match best {
        Some((i, n)) if n < mine => i,
        _ => own,
    }
}

/// A connection on its way to, or served by, thread `worker`; counted as open until dropped.
pub struct Live {
    balance: Arc<Balance>,
    worker: usize,
}

impl Drop for Live {
    fn drop(&mut self) {
        self.balance.open[self.worker].fetch_sub(1, Ordering::Relaxed);
        self.balance.gauges[self.worker].dec();
    }
}

/// The open connections of every thread, and a way to hand each one a connection.
pub struct Balance {
    open: Box<[AtomicUsize]>,
    /// `tfmirror_client_connections` of each thread.
    gauges: Box<[IntGauge]>,
    /// Set once each thread runs; closed once it stopped.
    inbox: Box<[OnceLock<UnboundedSender<Handoff>>]>,
}

impl Balance {
    pub fn new(threads: usize) -> Arc<Balance> {
        Arc::new(Balance {
            open: (0..threads).map(|_| AtomicUsize::new(0)).collect(),
            gauges: (0..threads)
                .map(|i| metrics::CLIENT_CONNECTIONS.with_label_values(&[&format!("tfmirror-{i}")]))
                .collect(),
            inbox: (0..threads).map(|_| OnceLock::new()).collect(),
        })
    }

    /// Thread `worker` takes hand-offs from now on, through `inbox`.
    pub fn register(&self, worker: usize, inbox: UnboundedSender<Handoff>) {
        let _ = self.inbox[worker].set(inbox);
    }

    /// Where a connection `own` just accepted should go ([`pick`] over the current counts).
    pub fn choose(&self, own: usize) -> usize {
        let open = self.open.iter().zip(self.inbox.iter());
        pick(
            own,
            open.map(|(n, inbox)| {
                let taking = inbox.get().is_some_and(|s| !s.is_closed());
                taking.then(|| n.load(Ordering::Relaxed))
            }),
        )
    }

    /// Count a connection as thread `worker`'s from now until the returned guard is dropped.
    pub fn enter(self: &Arc<Self>, worker: usize) -> Live {
        self.open[worker].fetch_add(1, Ordering::Relaxed);
        self.gauges[worker].inc();
        Live {
            balance: self.clone(),
            worker,
        }
    }

    /// Hand `item` to thread `worker`; gives it back if that thread takes none (any more).
    pub fn send(&self, worker: usize, item: Handoff) -> Result<(), Handoff> {
        match self.inbox[worker].get() {
            Some(inbox) => inbox.send(item).map_err(|e| e.0),
            None => Err(item),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fewest_open_connections_win_and_ties_stay() {
        // (accepting thread, each thread's open connections or None) -> the thread to serve
        let table: &[(usize, &[Option<usize>], usize)] = &[
            // Even: keep it, no hand-off.
            (0, &[Some(0), Some(0)], 0),
            (1, &[Some(3), Some(3)], 1),
            // More than another: the other.
            (0, &[Some(1), Some(0)], 1),
            (1, &[Some(4), Some(5)], 0),
            // Fewer here than anywhere: keep it.
            (0, &[Some(2), Some(5), Some(3)], 0),
            // The least busy of several; ties to the lowest index.
            (2, &[Some(4), Some(1), Some(6), Some(1)], 1),
            // Threads not taking hand-offs are skipped, however idle.
            (0, &[Some(5), None, Some(7)], 0),
            (0, &[Some(5), None, Some(2)], 2),
            // Only one thread: it serves.
            (0, &[Some(9)], 0),
        ];
        for &(own, open, want) in table {
            assert_eq!(
                pick(own, open.iter().copied()),
                want,
                "{own} accepted, open {open:?}"
            );
        }
    }

    #[test]
    fn counts_follow_the_guards_and_stopped_threads_take_nothing() {
        let b = Balance::new(2);
        let (tx0, _rx0) = tokio::sync::mpsc::unbounded_channel();
        let (tx1, rx1) = tokio::sync::mpsc::unbounded_channel();
        b.register(0, tx0);
        b.register(1, tx1);
        let a = b.enter(0);
        let c = b.enter(0);
        assert_eq!(b.choose(0), 1, "2 against 0");
        let d = b.enter(1);
        assert_eq!(b.choose(0), 1, "2 against 1");
        drop(a);
        assert_eq!(b.choose(0), 0, "1 against 1");
        drop((c, d));
        // Thread 1 stopped: nothing goes there, however idle.
        drop(rx1);
        let _e = b.enter(0);
        let _f = b.enter(0);
        assert_eq!(b.choose(0), 0);
    }
}
