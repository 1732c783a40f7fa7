//! The Rust core of lua-resty-counter-rs.
//!
//! - [`engine`]: the shared engine (docs/engine.md): counts in the shared
//!   dict's zone, lock-free, safe from any worker's death. `resty.counter`
//!   and the request counter count in it ([`ffi_engine`] is their C ABI);
//!   lax and strict move onto it in stage 4.
//! - [`pending`]: per-worker pending deltas, drained by a sync. Plain Rust,
//!   tested by `cargo test` with no Lua.
//! - [`ffi`]: the `extern "C"` functions LuaJIT calls through its FFI on the
//!   hot and sync paths (2-15 ns a call, compiled by the JIT).
//! - [`int64`], [`window`]: exact int64 values with Redis semantics and the
//!   sliding window, for the strict and lax counters and the rate limiter;
//!   [`ffi_int`] is their C ABI.
//! - `lua` (feature `module`): the mlua binding, `require "resty_counter_core"`,
//!   for module set-up and cold paths. It is the only code that names mlua.
//!
//! Crates the design names and this crate does not use yet: `once_cell`
//! (std's `Once` covers the one thing initialised once, see
//! [`ffi::install_panic_hook`]), `crossbeam-utils` (a worker's store is
//! touched by one thread only: nothing is shared, so nothing is padded).
//! [`stats`] renders the request counter's JSON with `serde_json`.

pub mod engine;
pub mod error;
pub mod ffi;
pub mod ffi_engine;
pub mod ffi_int;
pub mod histogram;
pub mod int64;
pub mod pending;
pub mod spool;
pub mod stats;
pub mod window;

#[cfg(all(feature = "module", not(test)))]
mod lua;

pub use error::Error;
