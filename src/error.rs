//! Errors of the core. Their `Display` text is exactly what a Lua user reads
//! (`nil, err` or a logged line), so it is short, lowercase and specific.

use std::fmt;

/// Everything the core can refuse.
///
/// Across the C ABI an error travels as its negative code (see
/// [`Error::code`]); Lua turns it back into this text through the module's
/// `error_message(code)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// More keys pending in one sync interval than a store can hold.
    TooManyKeys,
    /// An integer sum left the range that a shared dict (a double) holds
    /// exactly, or a sum left the int64 range.
    OutOfExactRange,
    /// A slot index that the store never handed out, or a null store.
    BadSlot,
    /// A Rust panic was caught at the C boundary (a bug in this library).
    Internal,
    /// Bytes in the shared dict that are not a request record (something
    /// else wrote to the key).
    CorruptRecord,
    /// An int64 update would leave the i64 range (Redis' message).
    Overflow,
    /// A stored value is not a base-10 int64 (Redis' message).
    NotInteger,
    /// An argument the core refuses: an unknown op or comparator code, a
    /// null pointer, a report with a bad window or clock.
    BadArgument,
}

impl Error {
    /// Every error, for the tests that check each code.
    pub const ALL: [Error; 8] = [
        Error::TooManyKeys,
        Error::OutOfExactRange,
        Error::BadSlot,
        Error::Internal,
        Error::CorruptRecord,
        Error::Overflow,
        Error::NotInteger,
        Error::BadArgument,
    ];

    /// The negative number that stands for this error in C return values.
    pub fn code(self) -> i32 {
        match self {
            Error::TooManyKeys => -1,
            Error::OutOfExactRange => -2,
            Error::BadSlot => -3,
            Error::Internal => -4,
            Error::CorruptRecord => -5,
            Error::Overflow => -6,
            Error::NotInteger => -7,
            Error::BadArgument => -8,
        }
    }

    /// The error a negative C return value stands for, if any.
    pub fn from_code(code: i32) -> Option<Error> {
        Error::ALL.iter().copied().find(|e| e.code() == code)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Error::TooManyKeys => "too many pending keys",
            Error::OutOfExactRange => "value out of exact integer range",
            Error::BadSlot => "bad slot",
            Error::Internal => "internal error",
            Error::CorruptRecord => "corrupt record",
            Error::Overflow => "increment or decrement would overflow",
            Error::NotInteger => "value is not an integer",
            Error::BadArgument => "bad argument",
        })
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_distinct_negatives() {
        for e in Error::ALL {
            assert!(e.code() < 0);
            assert_eq!(Error::from_code(e.code()), Some(e));
        }
        assert_eq!(Error::from_code(0), None);
        assert_eq!(Error::from_code(5), None);
        assert_eq!(Error::from_code(-99), None);
    }

    #[test]
    fn messages_are_what_lua_users_read() {
        assert_eq!(
            Error::OutOfExactRange.to_string(),
            "value out of exact integer range"
        );
        assert_eq!(Error::TooManyKeys.to_string(), "too many pending keys");
    }
}
