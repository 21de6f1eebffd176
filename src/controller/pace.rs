//! Renewals paced to the request rate limit, so that tokens due together are not renewed late.
//!
//! Under `--awx-max-rps R` the limiter spaces one host's requests 1.2/R apart, so a renewal
//! (`REQUESTS_PER_RENEWAL` requests) holds it for `1.2 × REQUESTS_PER_RENEWAL / R`. The pacer
//! plans each renewal a `slot` of that divided by [`LOAD`]: renewals planned back to back keep
//! the limiter busy 80% of the time, not 100%. At 100% (as planned before) any other request
//! queues the renewals behind it for good: in a wave of 10,000 at 20 requests a second, the
//! time between a renewal's start and its grant leaving was 1.3 s at the median and 14 s at the
//! 90th percentile, and renewals planned to end just before their renewal time ended after it.
//! Tokens issued together come due together: 1,000 of them at 20 requests a second need about
//! six minutes, so without pacing most would be renewed after their `status.renewalTime`. The
//! pacer keeps, per host, every held token's renewal time `t` in order and gives each a start
//! `s`: the latest schedule in which each renewal has its slot to itself and ends [`LEAD`]
//! before its renewal time (the grant's own round trip and any wait for the limiter),
//! `s_i = min(t_i − LEAD, s_{i+1}) − slot`, computed from the last token backwards. A renewal
//! then starts at `s`, early rather than late, and `status.renewalTime` (`t`) stays what it
//! was.
//! A start never comes before half of the token's intended age (`issued + (t − issued)/2`):
//! where renewals outrun the rate limit even so, some are late, rather than tokens renewed
//! right after their issue over and over.
//!
//! A start depends on the tokens due after it, so a token that joins (or is renewed to a
//! time) after others can pull their starts earlier than the reconcile each of them has
//! scheduled. [`RenewalPacer::overdue`] names those, and the controller reconciles them.
//! The pacer lives in memory: after a restart it is rebuilt as the tokens are reconciled
//! (the first pass over the cache), the same as before for the same set of tokens.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use jiff::Timestamp;

use crate::schedule;

/// AWX requests one renewal costs: the grant, the listing that finds the new token's row, the
/// PATCH that tags it, and later the revocation of the replaced token (and its lookup), as the
/// scale benchmark counts them (`awx_requests_per_renewal`).
pub const REQUESTS_PER_RENEWAL: u32 = 5;

/// The share of a host's rate limit that renewals planned back to back take: the rest absorbs
/// the requests the plan does not know of (searches, verifications, retries, another
/// AwxToken's first issue), so that a queue does not build up in the limiter.
pub const LOAD: f64 = 0.8;

/// How long before its renewal time a paced renewal is planned to end: its grant's round trip
/// (over 1 s, up to 3 s, on a busy AWX) and any wait for the limiter. At most a twentieth of
/// the token's intended age, so that a token renewed every few seconds is not renewed at half
/// its age.
pub const LEAD: Duration = Duration::from_secs(5);

/// [`LEAD`], or a twentieth of the intended age (twice `due − floor`) when that is shorter.
fn lead(due: Timestamp, floor: Timestamp) -> Duration {
    LEAD.min(schedule::span(floor, due) / 10)
}

/// The time the pacer gives one renewal under a limit of `max_rps` requests a second.
pub fn slot(max_rps: std::num::NonZeroU32) -> Duration {
    Duration::from_secs(u64::from(REQUESTS_PER_RENEWAL)).mul_f64(1.2 / LOAD) / max_rps.get()
}

/// One held token's place in its host's renewal order: its renewal time and uid. The uid is
/// one allocation shared by the order and `places` (the pacer holds every renewable token).
type Key = (Timestamp, Arc<str>);

#[derive(Debug)]
struct Entry<R> {
    /// The start no earlier than which the renewal would not help: half the intended age.
    floor: Timestamp,
    start: Timestamp,
    /// The latest reconcile this token has scheduled (its start when it was last booked).
    wake: Timestamp,
    object: R,
}

#[derive(Debug)]
struct Book<R> {
    hosts: HashMap<Arc<str>, BTreeMap<Key, Entry<R>>>,
    /// uid → (host, key); the host is the one of `hosts`' keys.
    places: HashMap<Arc<str>, (Arc<str>, Key)>,
}

/// The renewal order of every host; `R` names an object for the controller (its reference).
#[derive(Debug)]
pub struct RenewalPacer<R> {
    /// `None`: no rate limit, so every renewal starts at its renewal time.
    slot: Option<Duration>,
    book: Mutex<Book<R>>,
}

impl<R: Clone> RenewalPacer<R> {
    /// A pacer for `max_rps` requests a second per host (`None`: no pacing).
    pub fn new(max_rps: Option<std::num::NonZeroU32>) -> Self {
        Self {
            slot: max_rps.map(slot),
            book: Mutex::new(Book {
                hosts: HashMap::new(),
                places: HashMap::new(),
            }),
        }
    }

    /// The time the renewal of `uid`'s token (issued at `issued`, due at `due` at `host`)
    /// should start, at or before `due`. The token is expected to be reconciled by then.
    pub fn book(
        &self,
        uid: &str,
        object: &R,
        host: &str,
        issued: Timestamp,
        due: Timestamp,
    ) -> Timestamp {
        let Some(slot) = self.slot else {
            return due;
        };
        let mut book = lock(&self.book);
        let floor = schedule::add(issued, schedule::span(issued, due) / 2).min(due);
        let uid: Arc<str> = match book.places.get(uid).cloned() {
            Some((old_host, old_key)) => {
                if &*old_host == host && old_key.0 == due {
                    let entries = book.hosts.get_mut(host).expect("a booked host");
                    let entry = entries.get_mut(&old_key).expect("a booked entry");
                    entry.wake = entry.start;
                    return entry.start;
                }
                remove(&mut book, &old_host, &old_key, slot);
                old_key.1
            }
            None => uid.into(),
        };
        let key = (due, uid.clone());
        let host: Arc<str> = match book.hosts.get_key_value(host) {
            Some((shared, _)) => shared.clone(),
            None => host.into(),
        };
        book.places.insert(uid, (host.clone(), key.clone()));
        let entries = book.hosts.entry(host).or_default();
        entries.insert(
            key.clone(),
            Entry {
                floor,
                // `ripple` computes every start, this one's first.
                start: floor,
                wake: due,
                object: object.clone(),
            },
        );
        ripple(entries, &key, slot);
        let entry = entries.get_mut(&key).expect("just booked");
        entry.wake = entry.start;
        entry.start
    }

    /// `uid` holds no token to renew (deleted, suspended, not issued, moved to another shard).
    pub fn forget(&self, uid: &str) {
        let Some(slot) = self.slot else {
            return;
        };
        let mut book = lock(&self.book);
        if let Some((host, key)) = book.places.remove(uid) {
            remove(&mut book, &host, &key, slot);
        }
    }

    /// Tokens whose start has been pulled earlier than the reconcile they scheduled, and
    /// comes before `by`: each is named once (its wake is moved to its start).
    pub fn overdue(&self, by: Timestamp) -> Vec<R> {
        let mut book = lock(&self.book);
        let mut due = Vec::new();
        for entries in book.hosts.values_mut() {
            for entry in entries.values_mut() {
                if entry.start < entry.wake && entry.start <= by {
                    entry.wake = entry.start;
                    due.push(entry.object.clone());
                }
            }
        }
        due
    }

    /// Drops every token for which `keep` says no (gone from the cache).
    pub fn retain(&self, mut keep: impl FnMut(&R) -> bool) {
        let gone: Vec<Arc<str>> = {
            let book = lock(&self.book);
            book.places
                .iter()
                .filter(|(_, (host, key))| {
                    book.hosts
                        .get(host)
                        .and_then(|e| e.get(key))
                        .is_some_and(|e| !keep(&e.object))
                })
                .map(|(uid, _)| uid.clone())
                .collect()
        };
        for uid in gone {
            self.forget(&uid);
        }
    }

    /// How many tokens are booked (for tests and the log).
    pub fn len(&self) -> usize {
        lock(&self.book).places.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn remove<R>(book: &mut Book<R>, host: &str, key: &Key, slot: Duration) {
    let Some(entries) = book.hosts.get_mut(host) else {
        return;
    };
    entries.remove(key);
    // The token before it may now start later; so may those before that one.
    if let Some(before) = entries
        .range(..key.clone())
        .next_back()
        .map(|(k, _)| k.clone())
    {
        ripple(entries, &before, slot);
    }
    if entries.is_empty() {
        book.hosts.remove(host);
    }
}

/// Recomputes the start of `from` from its successor's, then of each token before it, as long
/// as starts change (a start depends only on the tokens due after it).
fn ripple<R>(entries: &mut BTreeMap<Key, Entry<R>>, from: &Key, slot: Duration) {
    let mut next_start = entries
        .range((
            std::ops::Bound::Excluded(from.clone()),
            std::ops::Bound::Unbounded,
        ))
        .next()
        .map(|(_, e)| e.start);
    for (key, entry) in entries.range_mut(..=from.clone()).rev() {
        let ends_by = schedule::sub(key.0, lead(key.0, entry.floor));
        let end = next_start.map_or(ends_by, |next| ends_by.min(next));
        let latest = schedule::sub(end, slot);
        let start = latest.max(entry.floor);
        let changed = start != entry.start;
        entry.start = start;
        if !changed && key != from {
            break;
        }
        next_start = Some(start);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use proptest::prelude::*;

    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    /// One renewal's share of 20 requests a second, at 80% load: 5 × 1.2 / 20 / 0.8 s.
    const SLOT: Duration = Duration::from_millis(375);

    /// 20 requests a second: one renewal every 0.375 s.
    fn pacer() -> RenewalPacer<String> {
        RenewalPacer::new(NonZeroU32::new(20))
    }

    fn book(p: &RenewalPacer<String>, uid: &str, due: i64) -> Timestamp {
        p.book(uid, &uid.to_string(), "awx:443", at(0), at(due))
    }

    #[test]
    fn unlimited_renewals_start_when_due() {
        let p = RenewalPacer::<String>::new(None);
        for i in 0..10 {
            assert_eq!(
                p.book(&format!("t{i}"), &String::new(), "h", at(0), at(600)),
                at(600)
            );
        }
        assert!(p.is_empty());
    }

    #[test]
    fn tokens_due_together_start_one_slot_apart_ending_at_the_time() {
        let p = pacer();
        let starts: Vec<Timestamp> = (0..4).map(|i| book(&p, &format!("t{i}"), 600)).collect();
        // Booked one by one: the last booked is the last in order (uid), so it keeps 600 and
        // the earlier ones were pulled back; ask again for each to read its current start.
        assert_eq!(starts[3], at(600) - LEAD - SLOT);
        let now: Vec<Timestamp> = (0..4).map(|i| book(&p, &format!("t{i}"), 600)).collect();
        let ms = |t: Timestamp| t.as_millisecond() - (at(600) - LEAD).as_millisecond();
        assert_eq!(
            now.iter().map(|t| ms(*t)).collect::<Vec<_>>(),
            [-1500, -1125, -750, -375]
        );
    }

    #[test]
    fn a_token_renewed_every_few_seconds_keeps_a_short_lead() {
        // Issued at 0, due at 4 s: the lead is a twentieth of that age (0.2 s), not 5 s, so
        // the renewal does not fall back to half its age.
        let p = pacer();
        assert_eq!(book(&p, "t", 4), at(4) - Duration::from_millis(200) - SLOT);
    }

    #[test]
    fn spread_out_renewals_are_not_moved() {
        let p = pacer();
        for i in 0..10 {
            assert_eq!(
                book(&p, &format!("t{i}"), 600 + i),
                at(600 + i) - LEAD - SLOT
            );
        }
    }

    #[test]
    fn a_later_token_pulls_earlier_ones_and_they_are_named_once() {
        let p = pacer();
        assert_eq!(book(&p, "a", 600), at(600) - LEAD - SLOT);
        assert!(p.overdue(at(10_000)).is_empty());
        // b is due 0.1 s after a: a must end by the time b starts.
        let b = p.book(
            "b",
            &"b".into(),
            "awx:443",
            at(0),
            at(600) + Duration::from_millis(100),
        );
        assert_eq!(b, at(600) - LEAD - Duration::from_millis(275));
        // Not yet within the horizon asked for: not named.
        assert!(p.overdue(at(500)).is_empty());
        assert_eq!(p.overdue(at(600)), ["a"]);
        assert!(p.overdue(at(600)).is_empty(), "named only once");
        assert_eq!(
            book(&p, "a", 600),
            at(600) - LEAD - Duration::from_millis(650)
        );
    }

    #[test]
    fn other_hosts_do_not_share_slots() {
        let p = pacer();
        assert_eq!(
            p.book("a", &"a".into(), "one:443", at(0), at(600)),
            at(600) - LEAD - SLOT
        );
        assert_eq!(
            p.book("b", &"b".into(), "two:443", at(0), at(600)),
            at(600) - LEAD - SLOT
        );
        assert_eq!(
            p.book("a", &"a".into(), "one:443", at(0), at(600)),
            at(600) - LEAD - SLOT
        );
    }

    #[test]
    fn a_forgotten_or_renewed_token_lets_earlier_ones_start_later() {
        let p = pacer();
        book(&p, "a", 600);
        book(&p, "b", 600);
        assert_eq!(book(&p, "a", 600), at(600) - LEAD - 2 * SLOT);
        p.forget("b");
        assert_eq!(book(&p, "a", 600), at(600) - LEAD - SLOT);
        book(&p, "b", 600);
        // b renewed: due again much later, out of a's way.
        assert_eq!(book(&p, "b", 3600), at(3600) - LEAD - SLOT);
        assert_eq!(book(&p, "a", 600), at(600) - LEAD - SLOT);
        p.retain(|r| r != "a");
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn a_start_never_comes_before_half_the_intended_age() {
        let p = pacer();
        // 1,000 tokens issued at 0 and due at 60: 300 s of renewals cannot fit in 60 s.
        for i in 0..1000 {
            book(&p, &format!("t{i:04}"), 60);
        }
        let earliest = (0..1000)
            .map(|i| book(&p, &format!("t{i:04}"), 60))
            .min()
            .unwrap();
        assert_eq!(earliest, at(30));
    }

    proptest! {
        /// Whatever the booking order: every start is at or before its renewal time and at
        /// or after its floor, and starts in renewal order are a slot apart unless a floor
        /// holds one back (the same answer as the backward pass over the whole set).
        #[test]
        fn starts_are_the_latest_spaced_schedule(
            dues in proptest::collection::vec(300i64..900, 1..60),
            order in any::<u64>(),
        ) {
            let p = pacer();
            let mut uids: Vec<usize> = (0..dues.len()).collect();
            // A deterministic shuffle of the booking order.
            uids.sort_by_key(|i| (*i as u64).wrapping_mul(order | 1).rotate_left(17));
            for &i in &uids {
                book(&p, &format!("t{i:03}"), dues[i]);
            }
            let mut by_due: Vec<(Timestamp, String)> = dues
                .iter()
                .enumerate()
                .map(|(i, d)| (at(*d), format!("t{i:03}")))
                .collect();
            by_due.sort();

            let mut expected = vec![at(0); by_due.len()];
            let mut next: Option<Timestamp> = None;
            for (k, (due, _)) in by_due.iter().enumerate().rev() {
                let ends_by = schedule::sub(*due, LEAD);
                let latest = schedule::sub(next.map_or(ends_by, |n| ends_by.min(n)), SLOT);
                let floor = schedule::add(at(0), schedule::span(at(0), *due) / 2);
                expected[k] = latest.max(floor);
                next = Some(expected[k]);
            }
            for (k, (due, uid)) in by_due.iter().enumerate() {
                let start = p.book(uid, uid, "awx:443", at(0), *due);
                prop_assert_eq!(start, expected[k], "{}", uid);
                prop_assert!(start <= *due);
            }
        }
    }
}
