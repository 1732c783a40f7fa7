//! The mlua binding: what `require "resty_counter_core"` returns. The only
//! module that knows Lua.
//!
//! It carries the cold paths: set-up (the panic hook, the ABI check, the
//! core's limits as Lua numbers) and turning error codes from the FFI
//! functions into the messages users read. Hot paths never come here: an
//! mlua call costs ~65 ns and is never compiled by the JIT.

use mlua::prelude::*;

use crate::error::Error;
use crate::ffi;
use crate::pending::{MAX_KEY_LEN, MAX_PENDING_KEYS, MAX_SAFE_INTEGER};
use crate::spool;
use std::path::Path;

#[mlua::lua_module]
fn resty_counter_core(lua: &Lua) -> LuaResult<LuaTable<'_>> {
    ffi::install_panic_hook();
    let module = lua.create_table()?;
    module.set("_VERSION", env!("CARGO_PKG_VERSION"))?;
    module.set("ffi_abi", ffi::ABI_VERSION)?;
    module.set("int_abi", crate::ffi_int::ABI_VERSION)?;
    // Below 2^53, so exact as a Lua number.
    module.set("max_safe_integer", MAX_SAFE_INTEGER as f64)?;
    module.set("max_key_len", MAX_KEY_LEN)?;
    module.set("max_pending_keys", MAX_PENDING_KEYS)?;
    // What a null return from an FFI function means: a panic was caught.
    module.set("internal_error_code", Error::Internal.code())?;
    module.set(
        "error_message",
        lua.create_function(|_, code: LuaValue| Ok(error_message(code)))?,
    )?;
    module.set(
        "take_panic_message",
        lua.create_function(|_, ()| Ok(ffi::take_panic_message()))?,
    )?;
    spool_functions(lua, &module)?;
    Ok(module)
}

/// The spool's file handling (src/spool.rs) for lax counters on Redis:
/// `ok, err = spool_write(dir, name, content)`, `names, err =
/// spool_list(dir, prefix)`, `stamp, recent, err = spool_stamp(dir)`, `ok, err =
/// spool_probe(dir)`, and `sleep_ms(ms)` (exit_worker_by_lua* has no
/// ngx.sleep, and an exiting worker may wait for a counter's flush lock).
fn spool_functions<'lua>(lua: &'lua Lua, module: &LuaTable<'lua>) -> LuaResult<()> {
    fn result<T>(done: std::io::Result<T>) -> (Option<T>, Option<String>) {
        match done {
            Ok(value) => (Some(value), None),
            Err(err) => (None, Some(err.to_string())),
        }
    }
    module.set(
        "spool_write",
        lua.create_function(|_, (dir, name, content): (String, String, LuaString)| {
            let done = spool::write(Path::new(&dir), &name, content.as_bytes());
            Ok(result(done.map(|()| true)))
        })?,
    )?;
    module.set(
        "spool_list",
        lua.create_function(|_, (dir, prefix): (String, String)| {
            Ok(result(spool::list(Path::new(&dir), &prefix)))
        })?,
    )?;
    module.set(
        "spool_stamp",
        lua.create_function(|_, dir: String| {
            Ok(match spool::stamp(Path::new(&dir)) {
                Ok((stamp, recent)) => (Some(stamp), Some(recent), None),
                Err(err) => (None, None, Some(err.to_string())),
            })
        })?,
    )?;
    module.set(
        "spool_probe",
        lua.create_function(|_, dir: String| {
            Ok(result(spool::probe(Path::new(&dir)).map(|()| true)))
        })?,
    )?;
    module.set(
        "sleep_ms",
        lua.create_function(|_, ms: u32| {
            std::thread::sleep(std::time::Duration::from_millis(u64::from(ms.min(1000))));
            Ok(())
        })?,
    )?;
    Ok(())
}

/// The text for an error code returned by an FFI function; codes come from
/// Lua as numbers (or int64 cdata turned into numbers by the shim).
fn error_message(code: LuaValue<'_>) -> String {
    let known = match code {
        LuaValue::Integer(code) => i32::try_from(code).ok().and_then(Error::from_code),
        LuaValue::Number(code) if code.fract() == 0.0 && code.abs() <= f64::from(i32::MAX) => {
            Error::from_code(code as i32)
        }
        _ => None,
    };
    match known {
        Some(error) => error.to_string(),
        None => format!("unknown error code {:?}", code),
    }
}
