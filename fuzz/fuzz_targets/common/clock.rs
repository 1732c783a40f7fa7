//! The one worker the engine's fuzz targets run as, on a clock the input
//! moves. Each target includes this file with `#[path]`: cargo-fuzz builds
//! every target as a binary of its own, with no library to share it from.

use std::cell::Cell;

use resty_counter_core::engine::lock::Holder;
use resty_counter_core::engine::table::Owner;

/// One worker, on a clock the input moves.
pub struct Clock(pub Cell<u64>);

impl Owner for Clock {
    fn me(&self) -> Holder {
        Holder {
            pid: 1,
            instance: 1,
        }
    }

    fn alive(&self, _: u32) -> bool {
        true
    }

    fn now(&self) -> u64 {
        self.0.get()
    }
}
