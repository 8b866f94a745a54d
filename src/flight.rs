//! Single flight: one upstream exchange per key at a time, whoever asks.
//!
//! - [`Flights`]: concurrent callers of one key share one future, run as a task of its own
//!   so that a caller that stops waiting (its deadline, its client gone) does not cancel it
//!   for the others. A caller may [`Flights::leave`] a flight it no longer trusts (a black
//!   hole past the deadline): later callers then start afresh, while those already holding
//!   it keep it. Generations make sure a finished or abandoned flight only ever removes
//!   itself, never a newer one of the same key. A flight whose answer its callers have
//!   learned ([`Flights::learned`]) is offered no more, except to say so to a caller that
//!   read what the answer changed before it was learned ([`Flights::join_or_start_since`]):
//!   that caller decides again from what is known now instead of asking the same again.
//! - [`Running`]: at most one background task per key (a refresh), released when its guard
//!   drops, so a task that panics or is cancelled does not block the key forever.
//!
//! The module side (`registry::ask`, listing refreshes) and the provider side (version list
//! refreshes) share these; the store's fills have their own file-backed mechanism
//! (`cache::fill`), as pingora's cache lock is separate from its connection pool.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, Shared};
use futures::FutureExt;

/// Which flight of a key a caller joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generation(u64);

/// A flight's shared future.
pub type Flight<V> = Shared<BoxFuture<'static, V>>;

/// A flight in the table: its generation, who started it, the future, and when its answer
/// was learned (from then on it is offered to no one).
struct Entry<O, V: Clone> {
    generation: Generation,
    owner: O,
    flight: Flight<V>,
    learned: Option<Instant>,
}

/// Flights in the air, by key.
type Table<K, V, O> = Arc<Mutex<HashMap<K, Entry<O, V>>>>;

/// The answer of this key's last flight was learned after the caller looked at what it
/// changes (a grant): decide again, from what is known now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Learned;

/// The table of flights in the air, by key. `O` says who started a flight (for a caller
/// that must know whether a joined exchange was made on its behalf); `()` when it does not
/// matter.
pub struct Flights<K, V: Clone, O = ()> {
    table: Table<K, V, O>,
    next: AtomicU64,
    /// How long a landed flight stays offered (its answer still being learned by those who
    /// waited for it), unless left sooner.
    linger: Duration,
}

impl<K, V, O> Default for Flights<K, V, O>
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
    O: Clone + Send + 'static,
{
    fn default() -> Self {
        Flights::lingering(Duration::ZERO)
    }
}

impl<K, V, O> Flights<K, V, O>
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
    O: Clone + Send + 'static,
{
    /// A table whose landed flights stay offered for `linger` (0: taken out on landing).
    pub fn lingering(linger: Duration) -> Self {
        Flights {
            table: Arc::new(Mutex::new(HashMap::new())),
            next: AtomicU64::new(0),
            linger,
        }
    }

    /// Join the flight of `key`, or start one for `owner` with `start` (spawned at once).
    /// When joined, says who started the flight joined.
    pub fn join_or_start(
        &self,
        key: K,
        owner: O,
        start: impl FnOnce() -> BoxFuture<'static, V>,
    ) -> (Generation, Flight<V>, Option<O>) {
        let mut table = self.table.lock().expect("flight table");
        if let Some(e) = table.get(&key).filter(|e| e.learned.is_none()) {
            return (e.generation, e.flight.clone(), Some(e.owner.clone()));
        }
        self.start(&mut table, key, owner, start)
    }

    /// [`join_or_start`](Self::join_or_start) for a caller that read, at `since`, what this
    /// key's answers change: [`Learned`] when the last flight's answer was learned after
    /// that, so the caller's reading is out of date and asking again would repeat it.
    pub fn join_or_start_since(
        &self,
        key: K,
        owner: O,
        since: Instant,
        start: impl FnOnce() -> BoxFuture<'static, V>,
    ) -> Result<(Generation, Flight<V>, Option<O>), Learned> {
        let mut table = self.table.lock().expect("flight table");
        match table.get(&key) {
            Some(e) if e.learned.is_some_and(|at| since <= at) => Err(Learned),
            Some(e) if e.learned.is_none() => {
                Ok((e.generation, e.flight.clone(), Some(e.owner.clone())))
            }
            _ => Ok(self.start(&mut table, key, owner, start)),
        }
    }

    /// The caller learned this flight's answer: offer it to no one from now on, but keep
    /// saying so to callers that looked before now ([`join_or_start_since`]) until the
    /// flight's linger is over.
    pub fn learned(&self, key: &K, generation: Generation) {
        let mut table = self.table.lock().expect("flight table");
        if let Some(e) = table.get_mut(key).filter(|e| e.generation == generation) {
            e.learned.get_or_insert_with(Instant::now);
        }
    }

    fn start(
        &self,
        table: &mut HashMap<K, Entry<O, V>>,
        key: K,
        owner: O,
        start: impl FnOnce() -> BoxFuture<'static, V>,
    ) -> (Generation, Flight<V>, Option<O>) {
        let generation = Generation(self.next.fetch_add(1, Ordering::Relaxed));
        let (landing, linger) = ((self.table.clone(), key.clone()), self.linger);
        let work = start();
        let flight = async move {
            let value = work.await;
            let (table, key) = landing;
            if linger.is_zero() {
                remove_if(&table, &key, generation);
            } else {
                tokio::spawn(async move {
                    tokio::time::sleep(linger).await;
                    remove_if(&table, &key, generation);
                });
            }
            value
        }
        .boxed()
        .shared();
        let entry = Entry {
            generation,
            owner,
            flight: flight.clone(),
            learned: None,
        };
        table.insert(key, entry);
        tokio::spawn(flight.clone());
        (generation, flight, None)
    }

    /// Stop offering this flight to new callers (it goes on for those that hold it).
    pub fn leave(&self, key: &K, generation: Generation) {
        remove_if(&self.table, key, generation);
    }

    /// No flight in the air.
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.table.lock().expect("flight table").is_empty()
    }
}

fn remove_if<K: Eq + Hash, O, V: Clone>(
    table: &Mutex<HashMap<K, Entry<O, V>>>,
    key: &K,
    generation: Generation,
) {
    let mut table = table.lock().expect("flight table");
    if table.get(key).is_some_and(|e| e.generation == generation) {
        table.remove(key);
    }
}

/// Keys with a background task running.
pub struct Running<K> {
    keys: Arc<Mutex<HashSet<K>>>,
}

impl<K: Eq + Hash + Clone> Default for Running<K> {
    fn default() -> Self {
        Running {
            keys: Arc::new(Mutex::new(HashSet::new())),
        }
    }
}

/// The right to run the task of a key; released when dropped.
pub struct RunningGuard<K: Eq + Hash> {
    keys: Arc<Mutex<HashSet<K>>>,
    key: K,
}

impl<K: Eq + Hash + Clone> Running<K> {
    /// Start the task of `key`, unless one is running.
    pub fn try_start(&self, key: K) -> Option<RunningGuard<K>> {
        let mut keys = self.keys.lock().expect("running keys");
        if !keys.insert(key.clone()) {
            return None;
        }
        Some(RunningGuard {
            keys: self.keys.clone(),
            key,
        })
    }
}

impl<K: Eq + Hash> Drop for RunningGuard<K> {
    fn drop(&mut self) {
        self.keys.lock().expect("running keys").remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    #[tokio::test]
    async fn callers_of_one_key_share_one_flight() {
        let flights: Flights<&str, u32> = Flights::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let start = |runs: Arc<AtomicUsize>| {
            move || {
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    7
                }
                .boxed()
            }
        };
        let (g1, f1, joined1) = flights.join_or_start("k", (), start(runs.clone()));
        let (g2, f2, joined2) = flights.join_or_start("k", (), start(runs.clone()));
        assert_eq!((g1, joined1, joined2), (g2, None, Some(())));
        assert_eq!((f1.await, f2.await), (7, 7));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        // Landed: the key is free, a new caller starts a new flight.
        tokio::task::yield_now().await;
        assert!(flights.is_empty());
        let (g3, f3, joined3) = flights.join_or_start("k", (), start(runs.clone()));
        assert!(joined3.is_none() && g3 != g1);
        f3.await;
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_left_flight_goes_on_for_its_holders_and_never_removes_a_newer_one() {
        let flights: Flights<&str, u32> = Flights::default();
        let slow = || {
            async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                1
            }
            .boxed()
        };
        let (old, held, _) = flights.join_or_start("k", (), slow);
        flights.leave(&"k", old);
        let (new, newer, joined) = flights.join_or_start("k", (), || async { 2 }.boxed());
        assert!(joined.is_none() && new != old);
        // The old flight lands after the new one started: the new one stays offered.
        let (_, again, joined_again) = flights.join_or_start("k", (), || async { 3 }.boxed());
        assert!(joined_again.is_some());
        assert_eq!(held.await, 1);
        assert_eq!((newer.await, again.await), (2, 2));
    }

    #[tokio::test]
    async fn a_flight_whose_callers_all_gave_up_still_lands() {
        let flights: Flights<&str, u32> = Flights::default();
        let done = Arc::new(AtomicUsize::new(0));
        let d = done.clone();
        let (_, flight, _) = flights.join_or_start("k", (), move || {
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                d.fetch_add(1, Ordering::SeqCst);
                1
            }
            .boxed()
        });
        drop(flight);
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(done.load(Ordering::SeqCst), 1, "spawned: not cancelled");
        assert!(flights.is_empty());
    }

    #[tokio::test]
    async fn a_lingering_flight_is_offered_after_landing_and_says_who_started_it() {
        let flights: Flights<&str, u32, char> = Flights::lingering(Duration::from_millis(50));
        let (_, first, _) = flights.join_or_start("k", 'a', || async { 1 }.boxed());
        assert_eq!(first.await, 1);
        tokio::task::yield_now().await;
        let (_, again, joined) = flights.join_or_start("k", 'b', || async { 2 }.boxed());
        assert_eq!(
            (again.await, joined),
            (1, Some('a')),
            "landed, still offered"
        );
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert!(flights.is_empty(), "then taken out");
    }

    /// Issue 28: a caller that read the grant store before a flight's answer was learned
    /// into it, and asks after, is told so (it decides again and finds the grant) instead
    /// of asking GitLab the same again; a caller that read after, or any caller once the
    /// linger is over, starts afresh; a flight not yet learned is joined as always.
    #[tokio::test]
    async fn a_learned_flight_tells_earlier_readers_and_is_offered_to_no_one() {
        let flights: Flights<&str, u32> = Flights::lingering(Duration::from_millis(200));
        let before = Instant::now();
        let (g, f, _) = flights
            .join_or_start_since("k", (), before, || async { 1 }.boxed())
            .unwrap();
        let (_, joined, by) = flights
            .join_or_start_since("k", (), before, || async { 9 }.boxed())
            .unwrap();
        assert_eq!(
            (f.await, joined.await, by),
            (1, 1, Some(())),
            "in the air: joined"
        );
        flights.learned(&"k", g);
        assert_eq!(
            flights
                .join_or_start_since("k", (), before, || async { 2 }.boxed())
                .err(),
            Some(Learned),
            "read before the answer was learned"
        );
        let after = Instant::now();
        let (g2, f2, by) = flights
            .join_or_start_since("k", (), after, || async { 3 }.boxed())
            .unwrap();
        assert_eq!((f2.await, by), (3, None), "read after: a new flight");
        assert_ne!(g2, g);
        let (_, f3, by) = flights.join_or_start("k", (), || async { 4 }.boxed());
        assert_eq!(
            (f3.await, by),
            (3, Some(())),
            "the new flight, not yet learned"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(flights.is_empty(), "taken out after the linger");
    }

    #[test]
    fn one_task_per_key_released_when_its_guard_drops() {
        let running: Running<String> = Running::default();
        let guard = running.try_start("k".into()).expect("first");
        assert!(running.try_start("k".into()).is_none());
        assert!(running.try_start("other".into()).is_some());
        drop(guard);
        assert!(running.try_start("k".into()).is_some());
    }
}
