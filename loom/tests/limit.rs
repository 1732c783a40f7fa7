//! Every interleaving of the limit records' protocol
//! (src/engine/limit.rs) with the pair as one atomic unit: two workers at
//! the cap never both allowed; two workers on either side of a window's
//! turn both counted in their own window; an uncommit racing an event at
//! the cap.

use loom::sync::{Arc, Mutex};
use loom::thread;

use resty_counter_loom::limit::{counts, incoming, pack, uncommit, Counts, Rule};
use resty_counter_loom::strict::Pair;
use resty_counter_loom::ModelPair;

const FIXED1: Rule = Rule {
    limit: 1,
    window: 1.0,
    sliding: false,
};

const SLIDING2: Rule = Rule {
    limit: 2,
    window: 1.0,
    sliding: true,
};

fn record(index: u64, prev: u64, current: u64) -> Arc<ModelPair> {
    Arc::new(ModelPair(Mutex::new(pack(Counts {
        index,
        prev,
        current,
    }))))
}

/// Two workers race for the last event of a window (`rule`, `index` each
/// and `elapsed`): exactly one is allowed, and the record counts it once.
fn at_the_cap(rule: Rule, pair: Arc<ModelPair>, index: u64, elapsed: f64) -> [u64; 2] {
    let other = {
        let pair = pair.clone();
        thread::spawn(move || incoming(&*pair, &rule, index, elapsed, true).allowed)
    };
    let mine = incoming(&*pair, &rule, index, elapsed, true).allowed;
    let theirs = other.join().unwrap();
    assert!(mine != theirs, "exactly one allowed: {} {}", mine, theirs);
    pair.load()
}

#[test]
fn two_workers_at_a_fixed_cap_allow_one() {
    loom::model(|| {
        let after = at_the_cap(FIXED1, record(0, 0, 0), 5, 0.5);
        assert_eq!(
            after,
            pack(Counts {
                index: 5,
                prev: 0,
                current: 1
            })
        );
    });
}

#[test]
fn two_workers_rolling_into_a_window_at_the_cap_allow_one() {
    // The record holds window 4 (full): both roll it into 5 at once.
    loom::model(|| {
        let after = at_the_cap(FIXED1, record(4, 0, 1), 5, 0.5);
        assert_eq!(
            after,
            pack(Counts {
                index: 5,
                prev: 1,
                current: 1
            })
        );
    });
}

#[test]
fn two_workers_at_a_sliding_cap_allow_one() {
    // 2 of the previous window, half left: 1 + 0 now, room for one more.
    loom::model(|| {
        let after = at_the_cap(SLIDING2, record(4, 0, 2), 5, 0.5);
        assert_eq!(
            after,
            pack(Counts {
                index: 5,
                prev: 2,
                current: 1
            })
        );
    });
}

#[test]
fn workers_on_either_side_of_a_turn_count_in_their_own_window() {
    // One worker's clock is in window 6, the other's lags in 5 (full
    // but for one): both allowed, each counted in its window.
    loom::model(|| {
        let pair = record(5, 0, 0);
        let ahead = {
            let pair = pair.clone();
            thread::spawn(move || incoming(&*pair, &FIXED1, 6, 0.0, true).allowed)
        };
        let lagging = incoming(&*pair, &FIXED1, 5, 0.99, true).allowed;
        assert!(ahead.join().unwrap());
        assert!(lagging);
        assert_eq!(
            counts(&*pair, 6),
            Counts {
                index: 6,
                prev: 1,
                current: 1
            }
        );
    });
}

#[test]
fn an_uncommit_racing_an_event_at_the_cap() {
    // The window is full; one worker gives its event back while another
    // comes: allowed only after the give-back, never over the cap.
    loom::model(|| {
        let pair = record(5, 0, 1);
        let giver = {
            let pair = pair.clone();
            thread::spawn(move || uncommit(&*pair, &FIXED1, 5))
        };
        let allowed = incoming(&*pair, &FIXED1, 5, 0.5, true).allowed;
        assert!(giver.join().unwrap());
        let expected = if allowed { 1 } else { 0 };
        assert_eq!(counts(&*pair, 5).current, expected);
    });
}
