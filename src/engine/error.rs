//! What the engine refuses.

use std::fmt;

/// What the engine refuses. The `Display` text is what a Lua user reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// No room for a new key: the index or the arena is full.
    Full,
    /// A key longer than a shared dict takes.
    KeyTooLong,
    /// A record width of 0 or past the maximum.
    BadWidth,
    /// The key already has a record of another width (another kind).
    WidthMismatch { found: u32 },
    /// No published record starts at that offset.
    BadOffset,
    /// A sum would leave the `i64` range.
    Overflow,
    /// A counter's sum would leave the range a double holds exactly.
    OutOfExactRange,
    /// The region is smaller than the smallest table.
    RegionTooSmall,
    /// The region is larger than 32-bit word offsets reach.
    RegionTooLarge,
    /// The words are not a table (or not this one).
    NotATable,
    /// A table of another layout version.
    VersionMismatch { found: u64 },
    /// The zone is not laid out as this library knows nginx's pools.
    ZoneLayout(&'static str),
    /// The zone has no room for even the smallest region.
    NoRoom,
    /// Another live worker held the table lock (new keys and removals
    /// take it) for longer than a new key waits.
    Busy,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Full => f.write_str("no room for a new key in the shared engine"),
            Error::KeyTooLong => f.write_str("key too long"),
            Error::BadWidth => f.write_str("bad record width"),
            Error::WidthMismatch { found } => {
                write!(f, "the key holds another kind of record ({} cells)", found)
            }
            Error::BadOffset => f.write_str("no record at that offset"),
            Error::Overflow => f.write_str("increment or decrement would overflow"),
            Error::OutOfExactRange => f.write_str("value out of exact integer range"),
            Error::RegionTooSmall => f.write_str("the engine's region is too small"),
            Error::RegionTooLarge => f.write_str("the engine's region is too large"),
            Error::NotATable => f.write_str("not an engine region"),
            Error::VersionMismatch { found } => write!(
                f,
                "the shared dict holds an engine of layout version {} (this library has {}): \
                 restart nginx, or change the dict's size so that nginx makes it anew",
                found,
                super::table::VERSION
            ),
            Error::ZoneLayout(what) => {
                write!(f, "unsupported nginx shared memory layout: {}", what)
            }
            Error::NoRoom => f.write_str("the shared dict has no room left for the engine"),
            Error::Busy => f.write_str("the shared engine's table lock is held by a live worker"),
        }
    }
}

impl std::error::Error for Error {}
