//! Per-worker request records: what one nginx worker has recorded for each
//! (key, window) since its last flush, waiting to be merged into the shared
//! dict's records.
//!
//! The Lua shim maps each (key, window) it sees to a slot and records into
//! it through one FFI call per request. A flush merges each slot into the
//! dict's encoded record ([`RequestStore::merge_into`]) and, once the dict
//! has taken the result, releases the slot; a slot whose merge could not be
//! stored stays as it is and is merged again next time, so nothing is lost.

use crate::error::Error;
use crate::histogram::Histogram;
use crate::pending::MAX_PENDING_KEYS;

/// A worker's request records, in slots reused across flushes.
#[derive(Debug, Default)]
pub struct RequestStore {
    slots: Vec<Histogram>,
    in_use: Vec<bool>,
    free: Vec<u32>,
    /// The last merge's result, handed to Lua without a copy.
    encoded: Vec<u8>,
}

impl RequestStore {
    pub fn new() -> RequestStore {
        RequestStore::default()
    }

    /// An empty slot for a (key, window) first seen since the last flush.
    ///
    /// # Errors
    ///
    /// `TooManyKeys` past [`MAX_PENDING_KEYS`] slots in use.
    pub fn alloc(&mut self) -> Result<u32, Error> {
        if let Some(slot) = self.free.pop() {
            self.in_use[slot as usize] = true;
            return Ok(slot);
        }
        if self.slots.len() >= MAX_PENDING_KEYS {
            return Err(Error::TooManyKeys);
        }
        self.slots.push(Histogram::new());
        self.in_use.push(true);
        Ok((self.slots.len() - 1) as u32)
    }

    fn slot_mut(&mut self, slot: u32) -> Result<&mut Histogram, Error> {
        match self.in_use.get(slot as usize) {
            Some(true) => Ok(&mut self.slots[slot as usize]),
            _ => Err(Error::BadSlot),
        }
    }

    /// Records one request of `latency_ms` (non-negative and finite: the
    /// shim checks) in a slot.
    ///
    /// # Errors
    ///
    /// `BadSlot` for a slot not handed out.
    pub fn record(&mut self, slot: u32, latency_ms: f64) -> Result<(), Error> {
        self.slot_mut(slot)?.record(latency_ms);
        Ok(())
    }

    /// The slot's record merged into `stored` (an encoded record from the
    /// dict, empty when there is none yet), encoded. The slot is unchanged
    /// until [`RequestStore::release`].
    ///
    /// # Errors
    ///
    /// `BadSlot`; `CorruptRecord` when `stored` is not a record.
    pub fn merge_into(&mut self, slot: u32, stored: &[u8]) -> Result<&[u8], Error> {
        let mut merged = Histogram::decode(stored).map_err(|_| Error::CorruptRecord)?;
        merged.merge(self.slot_mut(slot)?);
        merged.encode(&mut self.encoded);
        Ok(&self.encoded)
    }

    /// Empties a slot and makes it free for reuse.
    ///
    /// # Errors
    ///
    /// `BadSlot` for a slot not handed out.
    pub fn release(&mut self, slot: u32) -> Result<(), Error> {
        *self.slot_mut(slot)? = Histogram::new();
        self.in_use[slot as usize] = false;
        self.free.push(slot);
        Ok(())
    }

    /// Slots in use: (key, window) pairs waiting for a flush.
    pub fn pending(&self) -> usize {
        self.slots.len() - self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_merge_into_what_the_dict_holds() {
        let mut store = RequestStore::new();
        let a = store.alloc().unwrap();
        let b = store.alloc().unwrap();
        store.record(a, 10.0).unwrap();
        store.record(a, 30.0).unwrap();
        store.record(b, 5.0).unwrap();

        let first = store.merge_into(a, &[]).unwrap().to_vec();
        let stored = Histogram::decode(&first).unwrap();
        assert_eq!((stored.count, stored.sum, stored.max), (2, 40.0, 30.0));

        // Merging again into the stored record adds once more: the caller
        // releases the slot once the dict has the result.
        let twice = Histogram::decode(store.merge_into(a, &first).unwrap()).unwrap();
        assert_eq!(twice.count, 4);
        store.release(a).unwrap();
        assert_eq!(store.pending(), 1);
        assert_eq!(store.record(a, 1.0), Err(Error::BadSlot));
        assert_eq!(store.merge_into(a, &first), Err(Error::BadSlot));
        assert_eq!(store.release(a), Err(Error::BadSlot));

        // A released slot comes back empty.
        assert_eq!(store.alloc().unwrap(), a);
        let fresh = Histogram::decode(store.merge_into(a, &[]).unwrap()).unwrap();
        assert_eq!(fresh.count, 0);
    }

    #[test]
    fn a_corrupt_stored_record_is_an_error_and_the_slot_survives() {
        let mut store = RequestStore::new();
        let a = store.alloc().unwrap();
        store.record(a, 2.0).unwrap();
        assert_eq!(
            store.merge_into(a, b"not a record"),
            Err(Error::CorruptRecord)
        );
        let ok = Histogram::decode(store.merge_into(a, &[]).unwrap()).unwrap();
        assert_eq!(ok.count, 1);
    }

    #[test]
    fn unknown_slots_are_errors() {
        let mut store = RequestStore::new();
        assert_eq!(store.record(0, 1.0), Err(Error::BadSlot));
        assert_eq!(store.release(7), Err(Error::BadSlot));
    }
}
