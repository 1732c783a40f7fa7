//! The engine's lock-free code, compiled over loom's atomics: the same
//! files as the library's `src/engine/`, included by path, at this crate's
//! root (where their `super::` leads; `crate::histogram` is the library's
//! too).

#![allow(dead_code)]

#[path = "../../src/engine/cell.rs"]
pub mod cell;
#[path = "../../src/engine/error.rs"]
mod error;
#[path = "../../src/histogram.rs"]
pub mod histogram;
#[path = "../../src/engine/lax.rs"]
pub mod lax;
#[path = "../../src/engine/lock.rs"]
pub mod lock;
#[path = "../../src/engine/requests.rs"]
pub mod requests;
#[path = "../../src/engine/strict.rs"]
pub mod strict;
#[path = "../../src/engine/table.rs"]
pub mod table;
#[path = "../../src/engine/word.rs"]
pub mod word;

pub use error::Error;

crate::impl_word!(word::Word, loom::sync::atomic::AtomicU64);
