//! The mlua binding: what `require "resty_counter_core"` returns. The only
//! module that knows Lua.
//!
//! It carries the cold paths: set-up (the panic hook, the ABI check, the
//! core's limits as Lua numbers), turning error codes from the FFI
//! functions into the messages users read, and the allocator stand-in that
//! puts a scrape's one big string on huge pages. Hot paths never come
//! here: an mlua call costs ~65 ns and is never compiled by the JIT.

use mlua::lua_State;
use mlua::prelude::*;

use crate::error::Error;
use crate::ffi;
use crate::pending::{MAX_KEY_LEN, MAX_PENDING_KEYS, MAX_SAFE_INTEGER};
use crate::spool;
use crate::stats::advise_huge_pages;
use std::cell::Cell;
use std::os::raw::{c_int, c_void};
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
    // SAFETY: a C function that reads one argument and never raises.
    let advise = unsafe { lua.create_c_function(advise_huge_strings)? };
    module.set("advise_huge_strings", advise)?;
    module.set("advised_string_bytes", ADVISED_BYTES)?;
    Ok(module)
}

// Huge pages for a scrape's one big string.
//
// LuaJIT's allocator maps every block of 128 KB or more afresh with mmap
// and unmaps it when freed, so `ffi.string` of a 147 MB text (100,000 keys
// of Prometheus text) writes into 37,000 fresh 4 KB pages: a page fault
// each, 67 ms of the worker's time here against 15 ms when the same memory
// is backed by huge pages (transparent huge pages set to `always`; this
// machine has `madvise`, where only memory advised with MADV_HUGEPAGE
// gets them). No API of LuaJIT places or advises that memory, but its
// allocator is a function of the VM (`lua_getallocf`): for the duration of
// one `ffi.string`, resty.counter.abi puts `advising_allocator` in its
// place, which calls the VM's own allocator and advises the large blocks
// it returns before LuaJIT writes into them. Every block still comes from
// and returns to the VM's allocator; the VM's own is back in place as soon
// as the string is made (or making it failed: the Lua side calls it under
// pcall), so nothing outlives the call.

/// lua.h's `lua_Alloc`.
type LuaAlloc = unsafe extern "C" fn(*mut c_void, *mut c_void, usize, usize) -> *mut c_void;

// From the VM that loads this module (module mode: its host provides them);
// none of them raises.
extern "C" {
    fn lua_getallocf(state: *mut lua_State, ud: *mut *mut c_void) -> LuaAlloc;
    fn lua_setallocf(state: *mut lua_State, allocate: LuaAlloc, ud: *mut c_void);
    fn lua_toboolean(state: *mut lua_State, index: c_int) -> c_int;
}

thread_local! {
    /// The VM's own allocator while `advising_allocator` stands in for it
    /// (a VM runs on one thread: nginx's workers have one).
    static VM_ALLOCATOR: Cell<Option<LuaAlloc>> = const { Cell::new(None) };
}

/// Blocks from this size up are advised: at least one whole huge page is
/// then within them wherever they start.
const ADVISED_BYTES: usize = 4 << 20;

/// The VM's allocator, and huge pages asked for the large blocks it gives
/// (see above). Never unwinds: it is called by LuaJIT's C code.
unsafe extern "C" fn advising_allocator(
    ud: *mut c_void,
    block: *mut c_void,
    old_bytes: usize,
    bytes: usize,
) -> *mut c_void {
    // Only called while installed, when VM_ALLOCATOR is set; a thread
    // without it (its storage gone) gets a failed allocation, which LuaJIT
    // raises as "not enough memory", rather than an abort.
    let vm_allocator = match VM_ALLOCATOR.try_with(Cell::get) {
        Ok(Some(allocate)) => allocate,
        _ => return std::ptr::null_mut(),
    };
    let given = vm_allocator(ud, block, old_bytes, bytes);
    if bytes >= ADVISED_BYTES && !given.is_null() {
        advise_huge_pages(given as usize, bytes);
    }
    given
}

/// `advise_huge_strings(on)`: with `on`, puts `advising_allocator` in the
/// place of the VM's allocator (remembering it); without, puts the VM's
/// back. Either is a no-op when already so. Never raises.
unsafe extern "C" fn advise_huge_strings(state: *mut lua_State) -> c_int {
    let on = lua_toboolean(state, 1) != 0;
    let mut ud = std::ptr::null_mut();
    let current = lua_getallocf(state, &mut ud);
    // VM_ALLOCATOR is set exactly while installed; the address check keeps
    // the stand-in from ever being remembered as the VM's own (it would
    // call itself).
    let _ = VM_ALLOCATOR.try_with(|vm| match vm.get() {
        None if on && current as *const () != advising_allocator as *const () => {
            vm.set(Some(current));
            lua_setallocf(state, advising_allocator, ud);
        }
        Some(vm_allocator) if !on => {
            vm.set(None);
            lua_setallocf(state, vm_allocator, ud);
        }
        _ => {}
    });
    0
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
