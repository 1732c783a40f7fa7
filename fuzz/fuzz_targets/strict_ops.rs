//! Strict records (src/engine/strict.rs) under arbitrary single updates,
//! deletes, batches and snapshots of three keys, with TTLs on a clock the
//! input moves, checked against a model: the values and expiries of a
//! `[Option<(i64, u64)>; 3]`. A batch applies all its adds or none (the
//! first overflow refuses it); an expired key reads absent and starts
//! again from 0; nothing is left frozen and the batch lock is free. Sweeps
//! retire a key's record (GONE) when it is deleted or expired, and only
//! then; an update, delete, batch or snapshot that meets GONE changed
//! nothing and goes on with a new record for the key (as the Lua side
//! looks the key up again), and the model's values hold throughout.
#![no_main]

use std::cell::Cell;
use std::sync::atomic::AtomicU64;

use libfuzzer_sys::fuzz_target;
use resty_counter_core::engine::lock::{holder, Holder};
use resty_counter_core::engine::strict::{
    self, AtomicPair, Batches, Change, Current, Pair, Refused, CONTROL_WIDTH, ENTRY_WORDS, GONE,
};

const KEYS: usize = 3;

/// The model's key: its value and expiry (0 none), when present.
type Key = Option<(i64, u64)>;

fn live(key: Key, now: u64) -> Option<(i64, u64)> {
    key.filter(|&(_, expiry)| expiry == 0 || now < expiry)
}

fn step(byte: u8) -> i64 {
    match byte % 4 {
        0 => i64::MAX - i64::from(byte),
        1 => i64::MIN + i64::from(byte),
        _ => i64::from(byte as i8),
    }
}

fuzz_target!(|data: &[u8]| {
    // Records for the keys and for each key made again after a removal.
    let records = KEYS + data.len() / 4 + 1;
    let cells: Vec<AtomicU64> = (0..3 * records + 1).map(|_| AtomicU64::new(0)).collect();
    let made = Cell::new(0);
    let fresh = || {
        let r = made.get();
        made.set(r + 1);
        unsafe { AtomicPair::of_cells(cells[3 * r..].as_ptr()) }
    };
    let mut pairs: Vec<&AtomicPair> = (0..KEYS).map(|_| fresh()).collect();
    let control: Vec<AtomicU64> = (0..CONTROL_WIDTH).map(|_| AtomicU64::new(0)).collect();
    let journal: Vec<AtomicU64> = (0..KEYS * ENTRY_WORDS).map(|_| AtomicU64::new(0)).collect();
    let alive = |_| true;
    let batches = Batches {
        control: &control,
        me: Holder {
            pid: 1,
            instance: 1,
        },
        alive: &alive,
    };
    let mut model: [Key; KEYS] = [None; KEYS];
    let clock = Cell::new(1u64);

    for op in data.chunks(4) {
        if op.len() < 4 {
            break;
        }
        let now = clock.get();
        let k = usize::from(op[1]) % KEYS;
        let ttl = u64::from(op[3] % 4) * 10;
        match op[0] % 6 {
            // An add of a step, with or without a ttl.
            0 => {
                let n = step(op[2]);
                let got = loop {
                    let got = strict::update(
                        pairs[k],
                        || now,
                        |c: &Current| {
                            let value = c.value.checked_add(n).ok_or(())?;
                            let expiry_ms = strict::expiry_after(c, false, ttl, || now);
                            Ok::<_, ()>(Change::Write { value, expiry_ms })
                        },
                    );
                    match got {
                        Err(Refused::Gone(_)) => pairs[k] = fresh(),
                        got => break got,
                    }
                };
                match live(model[k], now) {
                    Some((value, expiry)) => match value.checked_add(n) {
                        Some(sum) => {
                            assert!(got.is_ok());
                            model[k] = Some((sum, expiry));
                        }
                        None => assert!(got.is_err()),
                    },
                    None => {
                        assert_eq!(got.map(|c| c.live), Ok(false));
                        model[k] = Some((n, if ttl == 0 { 0 } else { now + ttl }));
                    }
                }
            }
            // A delete.
            1 => {
                let got = strict::update(
                    pairs[k],
                    || now,
                    |c: &Current| Ok::<_, ()>(if c.live { Change::Remove } else { Change::Keep }),
                );
                let was_live = match got {
                    Ok(got) => got.live,
                    Err(Refused::Gone(_)) => false,
                    Err(e) => panic!("{:?}", e),
                };
                assert_eq!(was_live, live(model[k], now).is_some());
                model[k] = None;
            }
            // A batch: an add to each key whose bit is set, all or none.
            2 => {
                let chosen: Vec<usize> = (0..KEYS).filter(|i| op[1] >> i & 1 == 1).collect();
                let n = step(op[2]);
                let (mut states, mut changes) = (Vec::new(), Vec::new());
                let got = loop {
                    let chosen_pairs: Vec<&AtomicPair> = chosen.iter().map(|&i| pairs[i]).collect();
                    let got = unsafe {
                        batches.run(
                            &chosen_pairs,
                            &journal,
                            || now,
                            |s, c| {
                                for (state, change) in s.iter().zip(c.iter_mut()) {
                                    *change = Change::Write {
                                        value: state.value.checked_add(n).ok_or(())?,
                                        expiry_ms: strict::expiry_after(state, false, ttl, || now),
                                    };
                                }
                                Ok::<_, ()>(())
                            },
                            &mut states,
                            &mut changes,
                        )
                    };
                    match got {
                        Err(Refused::Gone(i)) => pairs[chosen[i]] = fresh(),
                        got => break got,
                    }
                };
                let sums: Option<Vec<(i64, u64)>> = chosen
                    .iter()
                    .map(|&i| match live(model[i], now) {
                        Some((value, expiry)) => value.checked_add(n).map(|v| (v, expiry)),
                        None => Some((n, if ttl == 0 { 0 } else { now + ttl })),
                    })
                    .collect();
                match sums {
                    Some(sums) => {
                        assert!(got.is_ok());
                        for (&i, sum) in chosen.iter().zip(sums) {
                            model[i] = Some(sum);
                        }
                    }
                    None => assert!(got.is_err()),
                }
            }
            // A snapshot of all keys.
            3 => {
                let (mut states, mut changes) = (Vec::new(), Vec::new());
                loop {
                    let got = unsafe {
                        batches.run(
                            &pairs,
                            &journal,
                            || now,
                            |_, _| Ok::<_, ()>(()),
                            &mut states,
                            &mut changes,
                        )
                    };
                    match got {
                        Err(Refused::Gone(i)) => pairs[i] = fresh(),
                        got => break got.unwrap(),
                    }
                }
                for (state, &key) in states.iter().zip(&model) {
                    assert_eq!(state.value, live(key, now).map_or(0, |(v, _)| v));
                }
            }
            // Time passes.
            4 => clock.set(now + u64::from(op[2] % 32)),
            // A sweep of key k: its record retired exactly when it was
            // written and is absent now (or GONE already); made again at
            // once, or left GONE for the next operation to meet.
            _ => {
                let pair = pairs[k].load();
                let due =
                    pair == GONE || (!strict::untouched(pairs[k]) && live(model[k], now).is_none());
                assert_eq!(strict::retire(pairs[k], || now), due);
                if due && op[2] & 1 == 1 {
                    pairs[k] = fresh();
                }
            }
        }
    }

    let now = clock.get();
    for (pair, &key) in pairs.iter().zip(&model) {
        let got = strict::get(*pair, || now).expect("nothing left frozen");
        assert_eq!(got.value, live(key, now).map_or(0, |(v, _)| v));
    }
    assert_eq!(holder(&control[0]), None);
});
