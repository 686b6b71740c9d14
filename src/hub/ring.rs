//! A filter's recent messages, shared by the connections subscribed to it.
//!
//! A publish is one append that every reader sees at once; each
//! connection's writer copies out what is new past its own cursor when it
//! next writes. Pushing into every connection's queue instead costs a lock
//! and a wake-up per recipient on the publishing thread, and while that loop
//! runs the writers on the other cores find one message each. With the ring
//! a publish costs the same for one reader or ten thousand (plus waking
//! those that were idle), and writers find more waiting per write.
//!
//! As in `tokio::sync::broadcast`, a slot is freed once every reader
//! subscribed when it was published has read it, so a quiet topic holds no
//! messages; and a ring holds at most `capacity` of them: a reader that far
//! behind has lost messages and is closed as a slow consumer.
//!
//! A message can reach one connection through several rings (an exact and
//! a wildcard subscription, or several rooms of one broadcast). Every copy
//! of one publish carries the same id, the rings of one publish are
//! appended under all their locks at once, and a reader reads all its rings
//! under all their locks, merging them by id: so it sees every copy or
//! none, and writes each publish once. Locks are always taken in address
//! order, so publishers and readers cannot deadlock.

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;

use super::Message;

/// Publish ids, shared by the copies of one publish.
static NEXT_PUBLISH: AtomicU64 = AtomicU64::new(1);

pub(crate) struct Ring {
    state: Mutex<State>,
    capacity: usize,
}

struct State {
    /// Position of `slots[0]`.
    start: u64,
    slots: VecDeque<Slot>,
    readers: usize,
    /// Readers to wake at the next append: idle ones, and ones whose socket
    /// is full (so they notice when they fall behind). A reader that leaves
    /// empties its own entry, found by index, so leaving costs O(1).
    waiters: Vec<Option<Waker>>,
    /// Entries of `waiters` emptied by readers that left.
    vacant: usize,
    /// Counts appends that woke the waiters: a reader parked in the current
    /// epoch is still in `waiters`.
    epoch: u64,
}

struct Slot {
    msg: Arc<Message>,
    id: u64,
    /// The copy's place in its publish's list of names: a reader reached by
    /// several copies takes the first.
    rank: usize,
    /// Readers yet to read it.
    rem: usize,
}

/// The reader lost messages: a ring dropped one it had not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lagged;

impl Ring {
    pub(crate) fn new(capacity: usize) -> Self {
        Ring {
            state: Mutex::new(State {
                start: 0,
                slots: VecDeque::new(),
                readers: 0,
                waiters: Vec::new(),
                vacant: 0,
                epoch: 0,
            }),
            capacity: capacity.max(1),
        }
    }

    // Nothing panics while holding the lock, so a poisoned ring is intact.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Messages held (for tests).
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.lock().slots.len()
    }
}

/// What appending one publish did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Appended {
    /// Copies queued, one per reader per ring.
    pub queued: u64,
    /// Unread copies dropped to make room: their readers lag.
    pub dropped: u64,
}

impl State {
    fn append(&mut self, msg: Arc<Message>, id: u64, rank: usize, capacity: usize) -> Appended {
        let mut done = Appended {
            queued: self.readers as u64,
            dropped: 0,
        };
        if self.readers == 0 {
            return done;
        }
        if self.slots.len() >= capacity
            && let Some(oldest) = self.slots.pop_front()
        {
            self.start += 1;
            done.dropped = oldest.rem as u64;
        }
        self.slots.push_back(Slot {
            msg,
            id,
            rank,
            rem: self.readers,
        });
        done
    }

    /// Frees the slots every reader has read.
    fn trim(&mut self) {
        while self.slots.front().is_some_and(|s| s.rem == 0) {
            self.slots.pop_front();
            self.start += 1;
        }
        // A burst grew it; an idle topic should not keep that.
        if self.slots.is_empty() && self.slots.capacity() > 64 {
            self.slots = VecDeque::new();
        }
    }

    fn end(&self) -> u64 {
        self.start + self.slots.len() as u64
    }

    fn head(&self, next: u64) -> Option<&Slot> {
        self.slots.get(next.checked_sub(self.start)? as usize)
    }

    /// Registers `waker` for the next append. A reader parked already keeps
    /// its place; its waker is replaced if another task now waits (a
    /// polling session's GET and its session task take turns).
    fn park(&mut self, cursor: &Cursor, waker: &Waker) {
        match cursor.parked.get() {
            Some((epoch, at)) if epoch == self.epoch => {
                if let Some(Some(parked)) = self.waiters.get_mut(at)
                    && !parked.will_wake(waker)
                {
                    parked.clone_from(waker);
                }
            }
            _ => {
                cursor.parked.set(Some((self.epoch, self.waiters.len())));
                self.waiters.push(Some(waker.clone()));
            }
        }
    }

    /// Takes the waiters to wake once the lock is released.
    fn take_waiters(&mut self, into: &mut Vec<Waker>) {
        if !self.waiters.is_empty() {
            self.epoch += 1;
            self.vacant = 0;
            into.extend(self.waiters.drain(..).flatten());
            // Sized for the readers there are, not for a crowd that left.
            if self.waiters.capacity() > 4 * self.readers.max(16) {
                self.waiters = Vec::new();
            }
        }
    }

    /// How far behind `cursor` is, or `None` if it lost messages.
    fn behind(&self, cursor: &Cursor) -> Option<u64> {
        let next = cursor.next.get();
        (next >= self.start).then(|| self.end() - next)
    }
}

/// Appends one publish to its rings, `(ring, copy, rank)`, each ring once.
/// The caller wakes the returned wakers, after every lock is released.
pub(crate) fn append(targets: &mut [(&Arc<Ring>, Arc<Message>, usize)]) -> (Appended, Vec<Waker>) {
    targets.sort_by_key(|(ring, ..)| Arc::as_ptr(ring));
    let mut guards: Vec<MutexGuard<'_, State>> = targets.iter().map(|(r, ..)| r.lock()).collect();
    // Taken under every lock: in each ring, ids grow in append order.
    let id = NEXT_PUBLISH.fetch_add(1, Ordering::Relaxed);
    let mut total = Appended::default();
    let mut wake = Vec::new();
    for (st, (ring, msg, rank)) in guards.iter_mut().zip(targets.iter()) {
        let done = st.append(msg.clone(), id, *rank, ring.capacity);
        total.queued += done.queued;
        total.dropped += done.dropped;
        st.take_waiters(&mut wake);
    }
    drop(guards);
    (total, wake)
}

/// [`append`] for the common case of one ring, without allocating for locks.
pub(crate) fn append_one(ring: &Ring, msg: Arc<Message>) -> (Appended, Vec<Waker>) {
    let mut st = ring.lock();
    let id = NEXT_PUBLISH.fetch_add(1, Ordering::Relaxed);
    let done = st.append(msg, id, 0, ring.capacity);
    let mut wake = Vec::new();
    st.take_waiters(&mut wake);
    drop(st);
    (done, wake)
}

/// Distinct publishes unread over `rings`, counted up to `limit + 1`.
fn distinct(rings: &[(&Cursor, &State)], limit: u64) -> u64 {
    let mut at: Vec<u64> = rings.iter().map(|(c, _)| c.next.get()).collect();
    let mut n = 0;
    while n <= limit {
        let next = rings
            .iter()
            .zip(&at)
            .filter_map(|((_, st), pos)| st.head(*pos))
            .map(|slot| slot.id)
            .min();
        let Some(id) = next else {
            break;
        };
        n += 1;
        for ((_, st), pos) in rings.iter().zip(at.iter_mut()) {
            if st.head(*pos).is_some_and(|slot| slot.id == id) {
                *pos += 1;
            }
        }
    }
    n
}

struct Cursor {
    ring: Arc<Ring>,
    /// Position of the next message to read.
    next: Cell<u64>,
    /// The ring epoch in which this reader last parked there, and its
    /// place among the ring's waiters.
    parked: Cell<Option<(u64, usize)>>,
}

/// One connection's cursors into the rings of its subscriptions. The hub
/// adds and removes cursors as the connection subscribes; the connection's
/// writer calls [`Reader::collect`].
pub struct Reader {
    /// In ring address order, the order locks are taken in.
    cursors: Vec<Cursor>,
    /// Unread messages, summed over its rings, beyond which the reader
    /// counts as lagging: one ring's capacity bounds one subscription, this
    /// bounds the connection.
    limit: u64,
}

impl Default for Reader {
    fn default() -> Self {
        Self::new(usize::MAX)
    }
}

impl Reader {
    pub fn new(limit: usize) -> Self {
        Reader {
            cursors: Vec::new(),
            limit: limit as u64,
        }
    }

    /// Checks that no ring dropped a message this reader had not read and
    /// that it is at most `limit` publishes behind. One publish can wait in
    /// several of its rings; the cheap sum over rings counts it once per
    /// ring, so only over the limit are distinct publishes counted.
    fn check_backlog(&self, rings: &[(&Cursor, &State)]) -> Result<(), Lagged> {
        let mut total = 0u64;
        for (c, st) in rings {
            total = total.saturating_add(st.behind(c).ok_or(Lagged)?);
        }
        if total <= self.limit || (rings.len() > 1 && distinct(rings, self.limit) <= self.limit) {
            return Ok(());
        }
        Err(Lagged)
    }

    /// Starts reading `ring` from its next message.
    pub(crate) fn follow(&mut self, ring: &Arc<Ring>) {
        let at = self
            .cursors
            .partition_point(|c| Arc::as_ptr(&c.ring) < Arc::as_ptr(ring));
        if self
            .cursors
            .get(at)
            .is_some_and(|c| Arc::ptr_eq(&c.ring, ring))
        {
            return;
        }
        let mut st = ring.lock();
        st.readers += 1;
        let cursor = Cursor {
            ring: ring.clone(),
            next: Cell::new(st.end()),
            parked: Cell::new(None),
        };
        drop(st);
        self.cursors.insert(at, cursor);
    }

    /// Stops reading `ring`; what it had not read is released.
    pub(crate) fn unfollow(&mut self, ring: &Arc<Ring>) {
        if let Some(at) = self.cursors.iter().position(|c| Arc::ptr_eq(&c.ring, ring)) {
            let cursor = self.cursors.remove(at);
            self.release(&cursor);
        }
    }

    fn release(&self, cursor: &Cursor) {
        let mut wake = Vec::new();
        let mut st = cursor.ring.lock();
        let from = cursor.next.get().max(st.start);
        let skip = (from - st.start) as usize;
        for slot in st.slots.iter_mut().skip(skip) {
            slot.rem = slot.rem.saturating_sub(1);
        }
        st.readers = st.readers.saturating_sub(1);
        if let Some((epoch, at)) = cursor.parked.get()
            && epoch == st.epoch
            && let Some(entry) = st.waiters.get_mut(at)
        {
            *entry = None;
            st.vacant += 1;
            // Readers come and go on a quiet ring: rather than let emptied
            // entries pile up until the next append, wake the rest (they
            // find nothing and park again, in a new epoch).
            if st.waiters.len() > 16 && st.vacant * 2 > st.waiters.len() {
                st.take_waiters(&mut wake);
            }
        }
        st.trim();
        drop(st);
        wake.into_iter().for_each(Waker::wake);
    }

    /// Hands `out` every message published to its rings since the last
    /// call, in order, each publish once; returns how many. With nothing
    /// new and a `waker`, the reader parks: the next append wakes it.
    pub fn collect(
        &mut self,
        waker: Option<&Waker>,
        mut out: impl FnMut(Arc<Message>),
    ) -> Result<usize, Lagged> {
        match self.cursors.as_slice() {
            [] => Ok(0),
            [one] => {
                let mut st = one.ring.lock();
                self.check_backlog(&[(one, &*st)])?;
                let next = one.next.get();
                let from = (next - st.start) as usize;
                let n = st.slots.len() - from;
                for slot in st.slots.range_mut(from..) {
                    slot.rem = slot.rem.saturating_sub(1);
                    out(slot.msg.clone());
                }
                one.next.set(next + n as u64);
                st.trim();
                if n == 0
                    && let Some(waker) = waker
                {
                    st.park(one, waker);
                }
                Ok(n)
            }
            many => {
                let mut guards: Vec<MutexGuard<'_, State>> =
                    many.iter().map(|c| c.ring.lock()).collect();
                let rings: Vec<(&Cursor, &State)> =
                    many.iter().zip(guards.iter().map(|g| &**g)).collect();
                self.check_backlog(&rings)?;
                drop(rings);
                let mut n = 0;
                // Every ring's ids grow in ring order, so the smallest head
                // is the next publish, and all its copies are at the heads.
                loop {
                    let best = many
                        .iter()
                        .zip(&guards)
                        .filter_map(|(c, st)| st.head(c.next.get()))
                        .min_by_key(|s| (s.id, s.rank))
                        .map(|s| (s.id, s.msg.clone()));
                    let Some((id, msg)) = best else {
                        break;
                    };
                    out(msg);
                    n += 1;
                    for (c, st) in many.iter().zip(guards.iter_mut()) {
                        let at = c.next.get();
                        let Some(i) = at.checked_sub(st.start) else {
                            continue;
                        };
                        if let Some(slot) = st.slots.get_mut(i as usize)
                            && slot.id == id
                        {
                            slot.rem = slot.rem.saturating_sub(1);
                            c.next.set(at + 1);
                        }
                    }
                }
                for (c, st) in many.iter().zip(guards.iter_mut()) {
                    st.trim();
                    if n == 0
                        && let Some(waker) = waker
                    {
                        st.park(c, waker);
                    }
                }
                Ok(n)
            }
        }
    }

    /// Parks on every ring without reading: for a writer whose socket is
    /// full, so that it still learns when it falls behind. Reports a lag
    /// already there.
    pub fn park(&self, waker: &Waker) -> Result<(), Lagged> {
        self.with_rings(|rings| {
            for (c, st) in rings {
                st.park(c, waker);
            }
        })
    }

    /// Whether a ring dropped a message this reader had not read, or it is
    /// more than its limit behind in all.
    pub fn lagged(&self) -> bool {
        self.with_rings(|_| ()).is_err()
    }

    /// Runs `then` with every ring locked, if the reader has not lagged.
    /// A single subscription, the common case, allocates nothing.
    fn with_rings(
        &self,
        then: impl FnOnce(&mut [(&Cursor, MutexGuard<'_, State>)]),
    ) -> Result<(), Lagged> {
        match self.cursors.as_slice() {
            [] => Ok(()),
            [one] => {
                let st = one.ring.lock();
                self.check_backlog(&[(one, &*st)])?;
                then(&mut [(one, st)]);
                Ok(())
            }
            many => {
                let mut locked: Vec<(&Cursor, MutexGuard<'_, State>)> =
                    many.iter().map(|c| (c, c.ring.lock())).collect();
                let rings: Vec<(&Cursor, &State)> =
                    locked.iter().map(|(c, st)| (*c, &**st)).collect();
                self.check_backlog(&rings)?;
                drop(rings);
                then(&mut locked);
                Ok(())
            }
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        for cursor in std::mem::take(&mut self.cursors) {
            self.release(&cursor);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::payload_of;

    fn msg(n: i64) -> Arc<Message> {
        Arc::new(Message::new("t".into(), None, payload_of(&n)))
    }

    fn read(r: &mut Reader) -> Result<Vec<i64>, Lagged> {
        let mut got = vec![];
        r.collect(Some(Waker::noop()), |m| {
            got.push(m.payload.get().parse().unwrap())
        })?;
        Ok(got)
    }

    #[test]
    fn every_reader_gets_each_message_and_read_slots_are_freed() {
        let ring = Arc::new(Ring::new(8));
        let (mut a, mut b) = (Reader::default(), Reader::default());
        a.follow(&ring);
        b.follow(&ring);
        assert_eq!(read(&mut a), Ok(vec![]), "parks");
        let (done, wake) = append_one(&ring, msg(1));
        assert_eq!(done.queued, 2);
        assert_eq!(wake.len(), 1, "only the parked reader is woken");
        append_one(&ring, msg(2));
        assert_eq!(read(&mut a), Ok(vec![1, 2]));
        assert_eq!(ring.held(), 2, "b has not read them");
        assert_eq!(read(&mut b), Ok(vec![1, 2]));
        assert_eq!(ring.held(), 0);
        // A late reader starts at the end; one that leaves releases its share.
        append_one(&ring, msg(3));
        let mut c = Reader::default();
        c.follow(&ring);
        append_one(&ring, msg(4));
        assert_eq!(read(&mut c), Ok(vec![4]));
        drop(b);
        assert_eq!(read(&mut a), Ok(vec![3, 4]));
        assert_eq!(ring.held(), 0);
    }

    #[test]
    fn a_reader_that_falls_a_ring_behind_lags() {
        let ring = Arc::new(Ring::new(3));
        let (mut slow, mut fast) = (Reader::default(), Reader::default());
        slow.follow(&ring);
        fast.follow(&ring);
        let mut dropped = 0;
        for n in 0..5 {
            dropped += append_one(&ring, msg(n)).0.dropped;
            assert_eq!(read(&mut fast), Ok(vec![n]));
        }
        assert_eq!(dropped, 2);
        assert!(slow.lagged());
        assert_eq!(read(&mut slow), Err(Lagged));
        assert_eq!(slow.park(Waker::noop()), Err(Lagged));
        drop(slow);
        assert_eq!(ring.held(), 0);
    }

    #[test]
    fn copies_of_one_publish_in_several_rings_are_read_once_first_rank_first() {
        let (x, y) = (Arc::new(Ring::new(8)), Arc::new(Ring::new(8)));
        let mut both = Reader::default();
        both.follow(&x);
        both.follow(&y);
        let mut only_y = Reader::default();
        only_y.follow(&y);
        let copy = |topic: &str, n: i64| Arc::new(Message::new(topic.into(), None, payload_of(&n)));
        append(&mut [(&x, copy("x", 1), 0), (&y, copy("y", 1), 1)]);
        append_one(&y, copy("y", 2));
        append(&mut [(&y, copy("y", 3), 0), (&x, copy("x", 3), 1)]);
        append_one(&x, copy("x", 4));
        let mut got = vec![];
        both.collect(Some(Waker::noop()), |m| {
            got.push(format!("{}{}", m.topic, m.payload.get()))
        })
        .unwrap();
        assert_eq!(got, ["x1", "y2", "y3", "x4"]);
        assert_eq!(read(&mut only_y), Ok(vec![1, 2, 3]));
        assert_eq!((x.held(), y.held()), (0, 0));
    }

    struct Count(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// A polling session's GET and its session task take turns waiting on
    /// one reader: the append wakes whichever parked last.
    #[test]
    fn a_reader_parked_again_by_another_task_wakes_that_task() {
        let ring = Arc::new(Ring::new(8));
        let mut r = Reader::default();
        r.follow(&ring);
        let (first, second) = (
            Arc::new(Count(Default::default())),
            Arc::new(Count(Default::default())),
        );
        let count = |c: &Arc<Count>| c.0.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(r.park(&Waker::from(first.clone())), Ok(()));
        let mut got = vec![];
        r.collect(Some(&Waker::from(second.clone())), |m| got.push(m))
            .unwrap();
        assert!(got.is_empty());
        let (_, wake) = append_one(&ring, msg(1));
        assert_eq!(wake.len(), 1, "one place per reader");
        wake.into_iter().for_each(Waker::wake);
        assert_eq!((count(&first), count(&second)), (0, 1));
    }

    #[test]
    fn readers_leaving_a_quiet_ring_do_not_pile_up_in_its_waiters() {
        let ring = Arc::new(Ring::new(8));
        let mut readers: Vec<Reader> = (0..40).map(|_| Reader::default()).collect();
        for r in &mut readers {
            r.follow(&ring);
            assert_eq!(read(r), Ok(vec![]), "parks");
        }
        assert_eq!(ring.lock().waiters.len(), 40);
        readers.truncate(10);
        assert!(
            ring.lock().waiters.len() <= 20,
            "emptied entries were dropped"
        );
        // Those still there are woken by the next append, or already were.
        for r in &mut readers {
            assert_eq!(read(r), Ok(vec![]));
        }
        append_one(&ring, msg(1));
        for r in &mut readers {
            assert_eq!(read(r), Ok(vec![1]));
        }
    }
}
