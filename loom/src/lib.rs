//! The engine's lock-free code, compiled over loom's atomics: the same
//! files as the library's `src/engine/`, included by path, at this crate's
//! root (where their `super::` leads; `crate::histogram` is the library's
//! too).

#![allow(dead_code)]

#[path = "../../src/engine/cell.rs"]
pub mod cell;
#[path = "../../src/engine/counter.rs"]
pub mod counter;
#[path = "../../src/engine/dwcas.rs"]
pub mod dwcas;
#[path = "../../src/engine/error.rs"]
mod error;
#[path = "../../src/engine/heavy.rs"]
pub mod heavy;
#[path = "../../src/histogram.rs"]
pub mod histogram;
#[path = "../../src/engine/lax.rs"]
pub mod lax;
#[path = "../../src/engine/limit.rs"]
pub mod limit;
#[path = "../../src/engine/lock.rs"]
pub mod lock;
#[path = "../../src/engine/requests.rs"]
pub mod requests;
#[path = "../../src/engine/strict.rs"]
pub mod strict;
#[path = "../../src/engine/table.rs"]
pub mod table;
#[path = "../../src/window.rs"]
pub mod window;
#[path = "../../src/engine/word.rs"]
pub mod word;

pub use error::Error;

crate::impl_word!(word::Word, loom::sync::atomic::AtomicU64);

/// A 16-byte pair as one atomic unit (a loom Mutex around the two words):
/// a fair model of a hardware double-width compare-and-swap.
pub struct ModelPair(pub loom::sync::Mutex<[u64; 2]>);

impl strict::Pair for ModelPair {
    fn load(&self) -> [u64; 2] {
        *self.0.lock().unwrap()
    }

    fn compare_exchange(&self, current: [u64; 2], new: [u64; 2]) -> Result<(), [u64; 2]> {
        let mut pair = self.0.lock().unwrap();
        if *pair == current {
            *pair = new;
            Ok(())
        } else {
            Err(*pair)
        }
    }
}
