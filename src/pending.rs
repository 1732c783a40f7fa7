//! Per-worker pending deltas: what one nginx worker has counted since its
//! last sync, waiting to be applied to the shared dict.
//!
//! A store is an arena of [`Slot`]s. The Lua shim maps each key touched in
//! the current interval to a slot and adds to it directly through a LuaJIT
//! FFI pointer (the hot path costs no call at all). A sync [`drain`]s every
//! slot handed out since the previous sync, so its cost is proportional to
//! the keys actually touched, and returns the slots to a free list: memory
//! is bounded by the busiest interval, not by every key ever seen.
//!
//! Integer steps accumulate in an `i64` and stay exact; fractional steps
//! (latency sums and the like) accumulate in an `f64` beside it.
//!
//! [`drain`]: PendingStore::drain

use crate::error::Error;

/// The largest integer a shared dict (which stores doubles) holds exactly:
/// 2^53 - 1. Beyond it `x + 1 == x` can hold, so counts would vanish.
pub const MAX_SAFE_INTEGER: i64 = (1 << 53) - 1;

/// The longest key a shared dict accepts (its own limit).
pub const MAX_KEY_LEN: usize = 65535;

/// How many keys one store may have pending in one interval. 2^22 slots are
/// 64 MiB per worker: far past what any shared dict holds, yet bounded.
pub const MAX_PENDING_KEYS: usize = 1 << 22;

/// One key's pending delta. LuaJIT writes these fields directly.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Slot {
    /// The sum of the integer steps, exact.
    pub integer: i64,
    /// The sum of the fractional steps.
    pub fractional: f64,
}

/// Whether a drained delta can be applied to a shared dict as it is.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeltaStatus {
    /// `value` is the delta, exact where the steps were integers.
    Ok = 0,
    /// The delta is beyond what a double holds exactly: applying it would
    /// round. It must stay pending, and the caller must report it.
    OutOfExactRange = 1,
}

/// One drained slot, as the sync loop reads it through FFI.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Delta {
    /// The slot it came from (the shim knows which key that was).
    pub slot: u32,
    /// A [`DeltaStatus`] as its `i32` value.
    pub status: i32,
    /// The integer part, to give back with [`PendingStore::add`] if the
    /// delta cannot be applied.
    pub integer: i64,
    /// The fractional part, likewise.
    pub fractional: f64,
    /// What to add to the shared dict: `integer + fractional` as a double.
    pub value: f64,
}

impl Delta {
    fn of(slot: u32, pending: Slot) -> Delta {
        let exact = pending.integer.abs() <= MAX_SAFE_INTEGER;
        let value = pending.integer as f64 + pending.fractional;
        let in_range = value.is_finite() && value.abs() <= MAX_SAFE_INTEGER as f64;
        let status = if exact && in_range {
            DeltaStatus::Ok
        } else {
            DeltaStatus::OutOfExactRange
        };
        Delta {
            slot,
            status: status as i32,
            integer: pending.integer,
            fractional: pending.fractional,
            value,
        }
    }
}

/// The pending deltas of one counter in one worker.
#[derive(Debug, Default)]
pub struct PendingStore {
    slots: Vec<Slot>,
    /// Whether each slot is handed out (parallel to `slots`).
    taken: Vec<bool>,
    /// Slots handed out since the last drain, in the order they were.
    in_use: Vec<u32>,
    free: Vec<u32>,
    /// The last drain's result; stays valid until the next drain.
    drained: Vec<Delta>,
}

impl PendingStore {
    pub fn new() -> PendingStore {
        PendingStore::default()
    }

    /// Hands out a zeroed slot for a key touched for the first time in this
    /// interval. The slot array may move: callers that keep a pointer to it
    /// must fetch [`slots_ptr`](Self::slots_ptr) again.
    ///
    /// # Errors
    ///
    /// [`Error::TooManyKeys`] when [`MAX_PENDING_KEYS`] are already pending.
    pub fn alloc(&mut self) -> Result<u32, Error> {
        if self.in_use.len() >= MAX_PENDING_KEYS {
            return Err(Error::TooManyKeys);
        }
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                // Bounded by MAX_PENDING_KEYS, far below u32::MAX.
                let slot = self.slots.len() as u32;
                self.slots.push(Slot::default());
                self.taken.push(false);
                slot
            }
        };
        self.taken[slot as usize] = true;
        self.in_use.push(slot);
        Ok(slot)
    }

    /// The base of the slot array, for LuaJIT to add through. Valid until
    /// the next [`alloc`](Self::alloc) or until the store is dropped.
    pub fn slots_ptr(&mut self) -> *mut Slot {
        self.slots.as_mut_ptr()
    }

    /// Adds to a slot handed out in this interval: how a delta that could
    /// not be applied goes back to pending.
    ///
    /// # Errors
    ///
    /// [`Error::BadSlot`] for a slot that is not in use;
    /// [`Error::OutOfExactRange`] if the integer sum would leave the int64
    /// range (the slot is then left as it was).
    pub fn add(&mut self, slot: u32, integer: i64, fractional: f64) -> Result<(), Error> {
        let pending = self.slot_mut(slot)?;
        let sum = pending
            .integer
            .checked_add(integer)
            .ok_or(Error::OutOfExactRange)?;
        pending.integer = sum;
        pending.fractional += fractional;
        Ok(())
    }

    /// Takes every delta pending since the last drain, in the order the keys
    /// were first touched, and frees their slots. Costs O(keys touched).
    pub fn drain(&mut self) -> &[Delta] {
        self.drained.clear();
        for &slot in &self.in_use {
            let pending = std::mem::take(&mut self.slots[slot as usize]);
            self.taken[slot as usize] = false;
            self.drained.push(Delta::of(slot, pending));
        }
        // Reuse the lowest slots first: they stay warm in cache.
        self.free.extend(self.in_use.drain(..).rev());
        &self.drained
    }

    /// How many keys have a delta pending.
    pub fn pending_keys(&self) -> usize {
        self.in_use.len()
    }

    /// A slot's current delta, if it is in use.
    pub fn get(&self, slot: u32) -> Option<Slot> {
        self.in_use_index(slot).map(|_| self.slots[slot as usize])
    }

    fn in_use_index(&self, slot: u32) -> Option<usize> {
        let index = slot as usize;
        (self.taken.get(index) == Some(&true)).then_some(index)
    }

    fn slot_mut(&mut self, slot: u32) -> Result<&mut Slot, Error> {
        let index = self.in_use_index(slot).ok_or(Error::BadSlot)?;
        Ok(&mut self.slots[index])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add_through_pointer(store: &mut PendingStore, slot: u32, integer: i64) {
        // What the Lua hot path does: write through the FFI pointer.
        let base = store.slots_ptr();
        unsafe { (*base.add(slot as usize)).integer += integer };
    }

    #[test]
    fn drain_returns_each_touched_key_once_in_first_touch_order() {
        let mut store = PendingStore::new();
        let a = store.alloc().unwrap();
        let b = store.alloc().unwrap();
        add_through_pointer(&mut store, b, 5);
        add_through_pointer(&mut store, a, 2);
        add_through_pointer(&mut store, a, 3);
        let drained = store.drain().to_vec();
        assert_eq!(drained.len(), 2);
        assert_eq!((drained[0].slot, drained[0].integer), (a, 5));
        assert_eq!((drained[1].slot, drained[1].integer), (b, 5));
        assert_eq!(drained[0].value, 5.0);
        assert_eq!(drained[0].status, DeltaStatus::Ok as i32);
        assert_eq!(store.pending_keys(), 0);
        assert!(store.drain().is_empty());
    }

    #[test]
    fn slots_are_reused_and_come_back_zeroed() {
        let mut store = PendingStore::new();
        let a = store.alloc().unwrap();
        add_through_pointer(&mut store, a, 7);
        store.drain();
        assert_eq!(store.get(a), None, "a drained slot is free");
        let again = store.alloc().unwrap();
        assert_eq!(again, a);
        assert_eq!(store.get(again), Some(Slot::default()));
    }

    #[test]
    fn memory_is_bounded_by_the_busiest_interval() {
        let mut store = PendingStore::new();
        for _ in 0..100 {
            for _ in 0..50 {
                store.alloc().unwrap();
            }
            assert_eq!(store.drain().len(), 50);
        }
        assert_eq!(store.slots.len(), 50);
    }

    #[test]
    fn a_zero_delta_is_still_drained_so_the_key_is_created() {
        let mut store = PendingStore::new();
        store.alloc().unwrap();
        let drained = store.drain();
        assert_eq!(drained.len(), 1);
        assert_eq!(drained[0].value, 0.0);
    }

    #[test]
    fn integers_stay_exact_beside_fractions() {
        let mut store = PendingStore::new();
        let s = store.alloc().unwrap();
        store.add(s, MAX_SAFE_INTEGER - 1, 0.0).unwrap();
        store.add(s, 1, 0.0).unwrap();
        let d = store.drain()[0];
        assert_eq!(d.integer, MAX_SAFE_INTEGER);
        assert_eq!(d.value, MAX_SAFE_INTEGER as f64);
        assert_eq!(d.status, DeltaStatus::Ok as i32);

        let s = store.alloc().unwrap();
        store.add(s, 3, 0.25).unwrap();
        store.add(s, 0, 0.5).unwrap();
        let d = store.drain()[0];
        assert_eq!((d.integer, d.fractional, d.value), (3, 0.75, 3.75));
    }

    #[test]
    fn beyond_two_to_the_53_is_flagged_not_rounded() {
        let mut store = PendingStore::new();
        let s = store.alloc().unwrap();
        store.add(s, MAX_SAFE_INTEGER, 0.0).unwrap();
        store.add(s, 1, 0.0).unwrap();
        let d = store.drain()[0];
        assert_eq!(d.status, DeltaStatus::OutOfExactRange as i32);
        assert_eq!(d.integer, MAX_SAFE_INTEGER + 1, "kept exact for a retry");

        let s = store.alloc().unwrap();
        store.add(s, -MAX_SAFE_INTEGER, -1.5).unwrap();
        assert_eq!(store.drain()[0].status, DeltaStatus::OutOfExactRange as i32);
    }

    #[test]
    fn int64_overflow_is_refused_and_leaves_the_slot_unchanged() {
        let mut store = PendingStore::new();
        let s = store.alloc().unwrap();
        store.add(s, i64::MAX, 0.0).unwrap();
        assert_eq!(store.add(s, 1, 0.0), Err(Error::OutOfExactRange));
        assert_eq!(store.get(s).unwrap().integer, i64::MAX);
        store.add(s, i64::MIN, 0.0).unwrap();
        assert_eq!(store.get(s).unwrap().integer, -1);
    }

    #[test]
    fn slots_not_in_use_are_refused() {
        let mut store = PendingStore::new();
        assert_eq!(store.add(0, 1, 0.0), Err(Error::BadSlot));
        let s = store.alloc().unwrap();
        store.drain();
        assert_eq!(store.add(s, 1, 0.0), Err(Error::BadSlot));
        assert_eq!(store.add(u32::MAX, 1, 0.0), Err(Error::BadSlot));
    }

    #[test]
    fn pending_keys_are_capped() {
        let mut store = PendingStore::new();
        for _ in 0..MAX_PENDING_KEYS {
            store.alloc().unwrap();
        }
        assert_eq!(store.alloc(), Err(Error::TooManyKeys));
        store.drain();
        assert!(store.alloc().is_ok());
    }
}
