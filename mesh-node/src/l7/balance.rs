//! Picking one of a service's endpoints for a request: round robin (the
//! default), least request (the less loaded of two random picks, as
//! Envoy's and Linkerd's P2C), or consistent hashing on a request header
//! (a hash ring: adding or removing one of N endpoints moves only ≈1/N of
//! the keys).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicUsize, Ordering},
    },
};

/// Points each endpoint puts on the hash ring: enough for an even share
/// (about ±8 % per endpoint) at a few KiB per service.
pub const RING_POINTS_PER_ENDPOINT: usize = 160;

/// The next index of `count`, taking turns.
pub fn round_robin(turn: &AtomicUsize, count: usize) -> usize {
    debug_assert!(count > 0);
    turn.fetch_add(1, Ordering::Relaxed) % count
}

/// The less loaded of two distinct random picks among `count` endpoints
/// (`load(i)` = requests in flight to endpoint `i`); the first on a tie.
/// `roll` gives uniform random numbers below its argument.
pub fn least_request(
    count: usize,
    load: impl Fn(usize) -> u32,
    mut roll: impl FnMut(usize) -> usize,
) -> usize {
    debug_assert!(count > 0);
    if count == 1 {
        return 0;
    }
    let first = roll(count);
    // A second pick distinct from the first, uniformly among the others.
    let second = (first + 1 + roll(count - 1)) % count;
    if load(second) < load(first) {
        second
    } else {
        first
    }
}

/// Requests in flight per endpoint, node-wide: what least request weighs.
/// Kept across configuration changes (an endpoint keeps its count).
#[derive(Debug, Default)]
pub struct InFlight(Mutex<HashMap<SocketAddr, Arc<AtomicU32>>>);

/// One request in flight to an endpoint, until dropped.
#[derive(Debug)]
pub struct InFlightGuard(Arc<AtomicU32>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl InFlight {
    fn counter(&self, endpoint: SocketAddr) -> Arc<AtomicU32> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(endpoint)
            .or_default()
            .clone()
    }

    /// Requests in flight to `endpoint` now.
    pub fn load(&self, endpoint: SocketAddr) -> u32 {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&endpoint)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Counts a request to `endpoint` until the guard drops.
    pub fn start(&self, endpoint: SocketAddr) -> InFlightGuard {
        let counter = self.counter(endpoint);
        counter.fetch_add(1, Ordering::Relaxed);
        InFlightGuard(counter)
    }

    /// Forgets endpoints with nothing in flight that are not in `live`.
    pub fn retain(&self, live: impl Fn(&SocketAddr) -> bool) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|endpoint, count| live(endpoint) || count.load(Ordering::Relaxed) > 0);
    }
}

/// A hash ring over a list of endpoints.
#[derive(Clone, Debug)]
pub struct HashRing {
    /// (point, endpoint index), sorted by point.
    points: Vec<(u64, usize)>,
}

impl HashRing {
    /// The ring of `endpoints`; an endpoint's points depend only on its
    /// address, so other endpoints' keys stay put when it comes or goes.
    pub fn new(endpoints: &[SocketAddr]) -> Self {
        let mut points = Vec::with_capacity(endpoints.len() * RING_POINTS_PER_ENDPOINT);
        for (index, endpoint) in endpoints.iter().enumerate() {
            let name = endpoint.to_string();
            for point in 0..RING_POINTS_PER_ENDPOINT {
                let mut key = name.clone().into_bytes();
                key.push(b'#');
                key.extend_from_slice(&(point as u32).to_be_bytes());
                points.push((hash(&key), index));
            }
        }
        points.sort_unstable();
        Self { points }
    }

    /// The endpoint index for `key`: the first point at or after its hash,
    /// wrapping around. `None` for an empty ring.
    pub fn pick(&self, key: &[u8]) -> Option<usize> {
        let first = self.points.first()?;
        let h = hash(key);
        let at = self.points.partition_point(|(point, _)| *point < h);
        Some(self.points.get(at).unwrap_or(first).1)
    }
}

/// FNV-1a, then a 64-bit finaliser (MurmurHash3's) so that nearby inputs
/// spread over the whole ring. Stable across builds and machines: every
/// node maps a key to the same endpoint.
pub fn hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        h ^= u64::from(*byte);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(n: usize) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([10, 89, (i / 200) as u8, (i % 200) as u8 + 2], 8080)))
            .collect()
    }

    #[test]
    fn round_robin_takes_turns() {
        let turn = AtomicUsize::new(0);
        let picks: Vec<usize> = (0..7).map(|_| round_robin(&turn, 3)).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2, 0]);
    }

    #[test]
    fn least_request_prefers_the_less_loaded_of_two_distinct_picks() {
        let loads = [5u32, 1, 9];
        // Every pair of rolls: the pick is never the worse of the two, and
        // the two are never the same endpoint.
        for a in 0..3 {
            for b in 0..2 {
                let mut rolls = [a, b].into_iter();
                let picked = least_request(3, |i| loads[i], |_| rolls.next().unwrap());
                let second = (a + 1 + b) % 3;
                assert_ne!(a, second);
                assert_eq!(loads[picked], loads[a].min(loads[second]));
            }
        }
        assert_eq!(least_request(1, |_| 7, |_| unreachable!()), 0);
    }

    #[test]
    fn least_request_steers_away_from_a_loaded_endpoint() {
        // Endpoint 0 has 10 requests in flight, the others none: the two
        // picks are distinct, so it always loses to the other one.
        let mut rng = fastrand::Rng::with_seed(7);
        let mut counts = [0usize; 4];
        for _ in 0..4000 {
            let i = least_request(4, |i| if i == 0 { 10 } else { 0 }, |n| rng.usize(..n));
            counts[i] += 1;
        }
        assert_eq!(counts[0], 0, "{counts:?}");
        for count in &counts[1..] {
            assert!((1100..=1570).contains(count), "{counts:?}");
        }
    }

    #[test]
    fn in_flight_counts_follow_guards_and_survive_pruning_while_busy() {
        let load = InFlight::default();
        let a: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:80".parse().unwrap();
        let first = load.start(a);
        let _second = load.start(a);
        let _other = load.start(b);
        assert_eq!((load.load(a), load.load(b)), (2, 1));
        drop(first);
        assert_eq!(load.load(a), 1);
        // Neither is live any more; `a` is still busy, so it stays.
        drop(_other);
        load.retain(|_| false);
        assert_eq!((load.load(a), load.load(b)), (1, 0));
        assert_eq!(load.0.lock().unwrap().len(), 1);
    }

    #[test]
    fn the_ring_spreads_keys_evenly_and_is_stable() {
        let list = endpoints(10);
        let ring = HashRing::new(&list);
        let mut counts = [0usize; 10];
        for key in 0..20_000 {
            counts[ring.pick(format!("user-{key}").as_bytes()).unwrap()] += 1;
        }
        // 2,000 each on average.
        for count in counts {
            assert!((1400..=2600).contains(&count), "{counts:?}");
        }
        // The same key, the same endpoint, on any ring built from the list.
        let again = HashRing::new(&list);
        assert_eq!(again.pick(b"user-42"), ring.pick(b"user-42"));
        assert_eq!(HashRing::new(&[]).pick(b"x"), None);
    }

    #[test]
    fn adding_or_removing_one_endpoint_moves_about_one_key_in_n() {
        let list = endpoints(10);
        let ring = HashRing::new(&list);
        let keys: Vec<String> = (0..10_000).map(|k| format!("session-{k}")).collect();
        let before: Vec<SocketAddr> = keys
            .iter()
            .map(|k| list[ring.pick(k.as_bytes()).unwrap()])
            .collect();

        // One more: only keys that now go to the newcomer moved, about 1/11.
        let grown = endpoints(11);
        let ring = HashRing::new(&grown);
        let mut moved = 0;
        for (key, was) in keys.iter().zip(&before) {
            let now = grown[ring.pick(key.as_bytes()).unwrap()];
            if now != *was {
                assert_eq!(now, grown[10], "a key moved between old endpoints");
                moved += 1;
            }
        }
        assert!((500..=1400).contains(&moved), "{moved} of 10000 moved");

        // One fewer: only the removed endpoint's keys moved.
        let shrunk: Vec<SocketAddr> = list.iter().copied().filter(|e| *e != list[3]).collect();
        let ring = HashRing::new(&shrunk);
        for (key, was) in keys.iter().zip(&before) {
            let now = shrunk[ring.pick(key.as_bytes()).unwrap()];
            if *was != list[3] {
                assert_eq!(now, *was, "a key of a remaining endpoint moved");
            }
        }
    }
}
