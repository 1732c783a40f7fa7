//! The shared engine: every worker's counts in one region of the shared
//! dict's zone, written lock-free on the request path, readable by every
//! worker at once, and left intact whatever happens to a worker.
//! docs/engine.md is the design; stages 1 to 3 are built.
//!
//! - [`word`]: the atomic words everything is made of (generic, so that the
//!   `loom` model tests run the very same code).
//! - [`table`]: keys to records of cells, lock-free.
//! - [`cell`]: counting in a cell (`i64` exact, `f64`).
//! - [`counter`]: `resty.counter`'s records.
//! - [`counter_text`]: their keys in the Prometheus text format.
//! - [`lax`]: lax counters on Redis: totals added and sent, the journal.
//! - [`requests`]: the request counter's records (windows in a ring).
//! - [`heavy`]: admission of keys with real traffic past `max_keys` (a
//!   count-min sketch of refused keys; evictions folded into the overflow).
//! - [`strict`]: strict counters' records (a value and its state changed by
//!   one double-width compare-and-swap; batches through a journal).
//! - [`limit`]: the limits' records (two windows' counts and the window in
//!   one pair, one double-width compare-and-swap an event).
//! - [`dwcas`]: the hardware's 16-byte compare-and-swap (x86_64,
//!   aarch64) under strict and limit records.
//! - [`lock`]: a try-lock that a dead holder cannot keep.
//! - [`zone`]: finding or making the region in an nginx zone.

pub mod cell;
pub mod counter;
pub mod counter_text;
pub mod dwcas;
mod error;
pub mod heavy;
pub mod lax;
pub mod limit;
pub mod lock;
pub mod requests;
pub mod strict;
pub mod table;
pub mod word;
pub mod zone;

pub use error::Error;
