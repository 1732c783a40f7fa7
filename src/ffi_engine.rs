//! The C ABI of the shared engine ([`crate::engine`]), declared for LuaJIT in
//! `lua/resty/counter/abi.lua` (checked by `tests/lua_abi.rs`): change both
//! together and bump [`ENGINE_ABI_VERSION`].
//!
//! Failures are negative codes (the `CODE_*` constants); the full text of
//! the last one in this process is read back with [`rc_engine_error`]. The
//! counting functions are the request path: they take a record's cells as a
//! pointer the worker keeps, cannot panic (no indexing past the four cells
//! a counter record has, no allocation, checked arithmetic) and so run
//! without the panic guard; every other function runs inside it.

use std::cell::RefCell;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::os::raw::{c_char, c_long, c_void};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use crate::engine::counter::{self, Counter};
use crate::engine::lax;
use crate::engine::lock::{self, Holder, Taken};
use crate::engine::requests::{self, Layout, Recorded, Requests, Roller};
use crate::engine::table::{Record, Table};
use crate::engine::zone::{self, SlabApi};
use crate::engine::Error;
use crate::ffi::guarded;
use crate::stats::{Report, Walk};

/// The version of the declarations below, checked by the Lua side.
pub const ENGINE_ABI_VERSION: i32 = 4;

pub const CODE_OUT_OF_EXACT_RANGE: i32 = -2;
pub const CODE_INTERNAL: i32 = -4;
pub const CODE_OVERFLOW: i32 = -6;
pub const CODE_BAD_ARGUMENT: i32 = -8;
pub const CODE_FULL: i32 = -20;
pub const CODE_KEY_TOO_LONG: i32 = -21;
pub const CODE_BAD_WIDTH: i32 = -22;
pub const CODE_WIDTH_MISMATCH: i32 = -23;
pub const CODE_NOT_FOUND: i32 = -24;
pub const CODE_NO_ENGINE: i32 = -25;
/// A request key past `max_keys`: the Lua side records it under the
/// overflow key.
pub const CODE_KEYS_FULL: i32 = -26;

/// [`rc_requests_record`]: the request is in its window.
pub const IN_WINDOW: i32 = 0;
/// [`rc_requests_record`]: the request is in the total only (its window's
/// slot holds a newer window).
pub const TOTAL_ONLY: i32 = 1;

/// The lock word (of [`crate::engine::table::LOCKS`]) of the counter's
/// dict mirror.
const MIRROR_LOCK: usize = 0;

thread_local! {
    static LAST_ERROR: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

fn remember(text: &str) {
    LAST_ERROR.with(|last| {
        let mut last = last.borrow_mut();
        last.clear();
        last.extend_from_slice(text.as_bytes());
    });
}

fn code_of(error: Error) -> i32 {
    remember(&error.to_string());
    match error {
        Error::Full => CODE_FULL,
        Error::KeyTooLong => CODE_KEY_TOO_LONG,
        Error::BadWidth => CODE_BAD_WIDTH,
        Error::WidthMismatch { .. } => CODE_WIDTH_MISMATCH,
        Error::BadOffset => CODE_NOT_FOUND,
        Error::Overflow => CODE_OVERFLOW,
        Error::OutOfExactRange => CODE_OUT_OF_EXACT_RANGE,
        Error::RegionTooSmall
        | Error::RegionTooLarge
        | Error::NotATable
        | Error::VersionMismatch { .. }
        | Error::ZoneLayout(_)
        | Error::NoRoom => CODE_NO_ENGINE,
    }
}

/// [`ENGINE_ABI_VERSION`], for the Lua side to check that it declares the
/// functions of this very library.
#[no_mangle]
pub extern "C" fn rc_engine_abi() -> i32 {
    ENGINE_ABI_VERSION
}

/// The text of the last failure in this process, its length in `*len`.
/// The pointer stays valid until the next failing call.
///
/// # Safety
///
/// `len` is writable.
#[no_mangle]
pub unsafe extern "C" fn rc_engine_error(len: *mut usize) -> *const u8 {
    LAST_ERROR.with(|last| {
        let last = last.borrow();
        if let Some(len) = len.as_mut() {
            *len = last.len();
        }
        last.as_ptr()
    })
}

/// One worker's handle on one dict's engine.
pub struct Engine {
    table: Table<'static, AtomicU64>,
    bytes: usize,
    key: Vec<u8>,
    changed: Vec<Changed>,
    /// A sync's scratch: record offsets, sorted.
    offsets: Vec<u32>,
}

impl Engine {
    /// `kind` and `key` as the table knows them, in `self.key`.
    fn set_key(&mut self, kind: u8, key: &[u8]) {
        self.key.clear();
        self.key.push(kind);
        self.key.extend_from_slice(key);
    }
}

/// The key a caller passed: `len` bytes at `key` (null only when empty).
///
/// # Safety
///
/// `key` points to `len` readable bytes, or `len` is 0.
unsafe fn key_bytes<'a>(key: *const u8, len: usize) -> &'a [u8] {
    if len == 0 {
        &[][..]
    } else {
        std::slice::from_raw_parts(key, len)
    }
}

/// The engine and the out-pointer of a call that looks a key up; None when
/// either is null, or the key is null with a length.
///
/// # Safety
///
/// As the calling function's.
unsafe fn key_call<'a>(
    engine: *mut Engine,
    key: *const u8,
    len: usize,
    cells: *mut *const AtomicU64,
) -> Option<(&'a mut Engine, &'a mut *const AtomicU64)> {
    match (engine.as_mut(), cells.as_mut()) {
        (Some(engine), Some(cells)) if !key.is_null() || len == 0 => Some((engine, cells)),
        _ => None,
    }
}

/// A counter whose value differs from what the dict mirrors.
#[repr(C)]
pub struct Changed {
    /// The record's cells, for [`rc_counter_mirrored`].
    pub cells: *const AtomicU64,
    /// The key (without the kind byte), in the region.
    pub key: *const u8,
    pub key_len: u32,
    /// 0: write `value`; [`NEEDS_BASE`]: import the dict's value first;
    /// [`FOREIGN`]: the same, and leave a dict value that is no number;
    /// [`CODE_OUT_OF_EXACT_RANGE`]: the value cannot be a double exactly.
    pub status: i32,
    pub value: f64,
}

/// A [`Changed::status`]: the record's creator died before it imported the
/// dict's value from before the engine.
pub const NEEDS_BASE: i32 = 1;

/// A [`Changed::status`]: the dict held something else than a number for
/// the key; if it still does, it is not overwritten.
pub const FOREIGN: i32 = 3;

fn random_u64() -> u64 {
    // std seeds each RandomState from the OS's randomness.
    RandomState::new().build_hasher().finish()
}

/// This process as a lock holder: its pid and an instance number of its
/// own (workers forked from one master share statics, hence the pid check).
fn me() -> Holder {
    static INSTANCE: AtomicU64 = AtomicU64::new(0);
    let pid = std::process::id();
    let known = INSTANCE.load(Relaxed);
    if known >> 32 == u64::from(pid) {
        return Holder {
            pid,
            instance: known as u32,
        };
    }
    let instance = (random_u64() as u32) | 1;
    INSTANCE.store((u64::from(pid) << 32) | u64::from(instance), Relaxed);
    Holder { pid, instance }
}

/// Whether a lock holder is still a process of this nginx: it exists
/// (`kill(pid, 0)`; EPERM: it does, under another user, as across a reload
/// that changes `user`) and, when /proc can tell, it is this worker's
/// master or one of its children. A dead holder's pid that came round to
/// another process (pid_max is 32768 on many hosts) is then not taken for
/// the holder, whoever runs it and however long it lives.
fn alive(pid: u32) -> bool {
    let pid = match i32::try_from(pid) {
        Ok(pid) if pid > 0 => pid,
        _ => return false,
    };
    let exists = unsafe { libc::kill(pid, 0) } == 0
        || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    exists && same_master(pid) != Some(false)
}

/// Whether `pid` is this process's parent or a child of it (a worker of the
/// same master, old or new across a reload); `None` when /proc cannot tell
/// (mounted with `hidepid`, the process gone meanwhile).
fn same_master(pid: i32) -> Option<bool> {
    let master = unsafe { libc::getppid() };
    if pid == master {
        return Some(true);
    }
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid)).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    let after_comm = stat.get(stat.rfind(')')? + 1..)?;
    let parent: i32 = after_comm.split_whitespace().nth(1)?.parse().ok()?;
    Some(parent == master)
}

/// nginx's slab functions, from the nginx binary this process runs in.
unsafe fn nginx_slab_api() -> Result<SlabApi, Error> {
    let symbol = |name: &[u8]| libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr() as *const c_char);
    let lock = symbol(b"ngx_shmtx_lock\0");
    let unlock = symbol(b"ngx_shmtx_unlock\0");
    let alloc = symbol(b"ngx_slab_alloc_locked\0");
    let page_size = symbol(b"ngx_pagesize\0") as *const usize;
    if lock.is_null() || unlock.is_null() || alloc.is_null() || page_size.is_null() {
        return Err(Error::ZoneLayout(
            "nginx's slab functions are not exported by this process (not inside nginx?)",
        ));
    }
    Ok(SlabApi {
        lock: std::mem::transmute::<*mut c_void, unsafe extern "C" fn(*mut c_void)>(lock),
        unlock: std::mem::transmute::<*mut c_void, unsafe extern "C" fn(*mut c_void)>(unlock),
        alloc_locked: std::mem::transmute::<
            *mut c_void,
            unsafe extern "C" fn(*mut c_void, usize) -> *mut c_void,
        >(alloc),
        page_size: *page_size,
    })
}

/// Finds the engine in a shared dict's zone, or makes it with `share` of
/// the zone's size, and hands out this worker's handle on it (never freed:
/// the zone lives as long as the worker).
///
/// # Errors
///
/// Returns 1 when this call made the engine, 0 when it found it, or
/// `CODE_NO_ENGINE` with the reason in [`rc_engine_error`].
///
/// # Safety
///
/// `zone` is null or what `ngx_http_lua_ffi_shdict_udata_to_zone` returned
/// in this nginx process; `engine` and `bytes` are writable.
#[no_mangle]
pub unsafe extern "C" fn rc_engine_attach(
    zone: *const c_void,
    share: f64,
    engine: *mut *mut Engine,
    bytes: *mut u64,
) -> i32 {
    if engine.is_null() || bytes.is_null() || !(share > 0.0 && share <= 1.0) {
        remember("bad argument to rc_engine_attach");
        return CODE_BAD_ARGUMENT;
    }
    guarded(CODE_INTERNAL, || {
        let api = match nginx_slab_api() {
            Ok(api) => api,
            Err(e) => return code_of(e),
        };
        let seed = [random_u64(), random_u64()];
        match zone::find_or_create(zone as *const u8, &api, share, seed) {
            Ok(region) => {
                *bytes = region.bytes as u64;
                let created = region.created;
                *engine = Box::into_raw(Box::new(Engine {
                    table: region.table,
                    bytes: region.bytes,
                    key: Vec::new(),
                    changed: Vec::new(),
                    offsets: Vec::new(),
                }));
                i32::from(created)
            }
            Err(e) => code_of(e),
        }
    })
}

/// The cells of the record of (`kind`, `key`), made with `width` zeroed
/// cells when `create` is non-zero and it has none.
///
/// # Errors
///
/// Returns 1 when this call made it, 0 when it existed, `CODE_NOT_FOUND`
/// when absent and not to be made, or `CODE_FULL`, `CODE_KEY_TOO_LONG`,
/// `CODE_WIDTH_MISMATCH`, `CODE_BAD_WIDTH`, `CODE_BAD_ARGUMENT`.
///
/// # Safety
///
/// `engine` is null or from [`rc_engine_attach`]; `key` points to `len`
/// readable bytes; `cells` is writable.
#[no_mangle]
pub unsafe extern "C" fn rc_engine_record(
    engine: *mut Engine,
    kind: u8,
    key: *const u8,
    len: usize,
    width: u32,
    create: i32,
    cells: *mut *const AtomicU64,
) -> i32 {
    let (engine, cells) = match key_call(engine, key, len, cells) {
        Some(both) => both,
        None => return CODE_BAD_ARGUMENT,
    };
    guarded(CODE_INTERNAL, || {
        engine.set_key(kind, key_bytes(key, len));
        let found = if create != 0 {
            engine.table.get_or_insert(&engine.key, width)
        } else {
            match engine.table.lookup(&engine.key) {
                Some(record) if record.width() == width => Ok((record, false)),
                Some(record) => Err(Error::WidthMismatch {
                    found: record.width(),
                }),
                None => return CODE_NOT_FOUND,
            }
        };
        match found {
            Ok((record, made)) => {
                *cells = record.cells().as_ptr();
                i32::from(made)
            }
            Err(e) => code_of(e),
        }
    })
}

/// The engine's figures, for self-metrics.
#[repr(C)]
pub struct EngineStats {
    pub bytes: u64,
    pub records: u64,
    pub max_records: u64,
    pub refused: u64,
    pub arena_used: u64,
    pub arena_total: u64,
}

/// Fills `out` with the engine's figures; 0, or `CODE_BAD_ARGUMENT`.
///
/// # Safety
///
/// `engine` is null or from [`rc_engine_attach`]; `out` is writable.
#[no_mangle]
pub unsafe extern "C" fn rc_engine_stats(engine: *const Engine, out: *mut EngineStats) -> i32 {
    let (engine, out) = match (engine.as_ref(), out.as_mut()) {
        (Some(engine), Some(out)) => (engine, out),
        _ => return CODE_BAD_ARGUMENT,
    };
    let stats = engine.table.stats();
    *out = EngineStats {
        bytes: engine.bytes as u64,
        records: stats.records,
        max_records: stats.max_records,
        refused: stats.refused,
        arena_used: stats.arena_used * 8,
        arena_total: stats.arena_total * 8,
    };
    0
}

/// # Safety
///
/// `cells` is null or a counter record's cells from [`rc_engine_record`].
unsafe fn counter_at<'a>(cells: *const AtomicU64) -> Option<Counter<'a, AtomicU64>> {
    if cells.is_null() {
        None
    } else {
        Some(Counter::new(std::slice::from_raw_parts(
            cells,
            counter::WIDTH as usize,
        )))
    }
}

/// Adds an integer step to a counter: the request path.
///
/// # Errors
///
/// 0, or `CODE_OUT_OF_EXACT_RANGE` (nothing changed), `CODE_BAD_ARGUMENT`.
///
/// # Safety
///
/// `cells` is null or a counter record's cells from [`rc_engine_record`].
#[no_mangle]
pub unsafe extern "C" fn rc_counter_add(cells: *const AtomicU64, step: i64) -> i32 {
    match counter_at(cells) {
        Some(counter) => match counter.add(step) {
            Ok(_) => 0,
            Err(_) => CODE_OUT_OF_EXACT_RANGE,
        },
        None => CODE_BAD_ARGUMENT,
    }
}

/// Adds a fractional step (finite) to a counter.
///
/// # Errors
///
/// As [`rc_counter_add`].
///
/// # Safety
///
/// As [`rc_counter_add`].
#[no_mangle]
pub unsafe extern "C" fn rc_counter_add_fractional(cells: *const AtomicU64, step: f64) -> i32 {
    match counter_at(cells) {
        Some(counter) => match counter.add_fractional(step) {
            Ok(_) => 0,
            Err(_) => CODE_OUT_OF_EXACT_RANGE,
        },
        None => CODE_BAD_ARGUMENT,
    }
}

/// A counter's value as every worker sees it now (0 for a null pointer).
///
/// # Safety
///
/// As [`rc_counter_add`].
#[no_mangle]
pub unsafe extern "C" fn rc_counter_value(cells: *const AtomicU64) -> f64 {
    counter_at(cells).map_or(0.0, |counter| counter.value())
}

/// Takes `base` (the dict's value from before the engine; NaN for one that
/// is no number) as the counter's base, as
/// [`Counter::import_base`]: 1 for the call that changed it, 0 otherwise.
///
/// # Safety
///
/// As [`rc_counter_add`].
#[no_mangle]
pub unsafe extern "C" fn rc_counter_import_base(cells: *const AtomicU64, base: f64) -> i32 {
    counter_at(cells).map_or(0, |counter| i32::from(counter.import_base(base)))
}

fn changed(record: Record<'static, AtomicU64>) -> Option<Changed> {
    let key = record.key_bytes();
    if key.first() != Some(&counter::KIND) || record.width() != counter::WIDTH {
        return None;
    }
    let counter = Counter::new(record.cells());
    let value = counter.value();
    let status = if !counter.has_base() {
        NEEDS_BASE
    } else if counter.is_foreign() {
        FOREIGN
    } else if counter.mirror().map(f64::to_bits) == Some(value.to_bits()) {
        return None;
    } else if value.abs() > counter::MAX_SAFE_INTEGER as f64 {
        CODE_OUT_OF_EXACT_RANGE
    } else {
        0
    };
    Some(Changed {
        cells: record.cells().as_ptr(),
        key: key[1..].as_ptr(),
        key_len: (key.len() - 1) as u32,
        status,
        value,
    })
}

/// `ngx_http_lua_ffi_shdict_store`, the function of the nginx lua module
/// that lua-resty-core's `set` and `safe_set` call (the same signature in
/// lua-nginx-module 0.10.23 and 0.10.29).
pub type ShdictStore = unsafe extern "C" fn(
    zone: *mut c_void,
    op: i32,
    key: *const u8,
    key_len: usize,
    value_type: i32,
    str_value: *const u8,
    str_value_len: usize,
    num_value: f64,
    exptime: c_long,
    user_flags: i32,
    errmsg: *mut *const c_char,
    forcible: *mut i32,
) -> i32;

/// A sync's way into the dict: its zone and the store function, both from
/// the Lua side (which has them from lua-resty-core).
#[derive(Clone, Copy)]
struct DictStore {
    zone: *mut c_void,
    store: ShdictStore,
}

/// `NGX_HTTP_LUA_SHDICT_SAFE_STORE`: never evict another key for room.
const SHDICT_SAFE_STORE: i32 = 0x0004;
/// `LUA_TNUMBER`, the store's value type for a double.
const SHDICT_TNUMBER: i32 = 3;

impl DictStore {
    /// Writes a changed counter's value into the dict with `safe_set` and
    /// marks it mirrored: true when done. Only plain changes (status 0);
    /// the others, and a write the dict refuses (no memory), stay listed for
    /// the Lua side, which imports bases and words the errors.
    unsafe fn write(self, change: &Changed) -> bool {
        if change.status != 0 {
            return false;
        }
        let mut errmsg = std::ptr::null();
        let mut forcible = 0;
        let rc = (self.store)(
            self.zone,
            SHDICT_SAFE_STORE,
            change.key,
            change.key_len as usize,
            SHDICT_TNUMBER,
            std::ptr::null(),
            0,
            change.value,
            0,
            0,
            &mut errmsg,
            &mut forcible,
        );
        if rc != 0 {
            return false;
        }
        // The dict holds the value before the mirror says so: a sync cut
        // short between the two writes the same value again.
        if let Some(counter) = counter_at(change.cells) {
            counter.set_mirror(change.value);
        }
        true
    }
}

/// Starts a sync of the dict mirror: takes the mirror lock and lists every
/// counter whose value differs from what the dict holds (`*count` of them
/// at `*out`, valid until [`rc_counter_sync_end`]).
///
/// Given `store` (and the dict's `zone`), writes the plain changes itself
/// (the bulk of a sync: no Lua string, no call per key from Lua), counts
/// them in `*written`, and lists only the rest; without it (null), lists
/// them all.
///
/// While another live worker holds the lock, waits up to `wait_ms` for it:
/// that worker listed its changes when it began, so counts made since then
/// (this worker's last ones, at exit) reach the dict only by a sync that
/// begins after it ends. A timer's sync passes 0 (its next tick copies
/// them); a sync asked for by hand, whose caller reads the dict next, waits.
/// The wait blocks this worker, as a sync itself does: one sync of 10,000
/// keys takes a few milliseconds.
///
/// # Errors
///
/// 0, or 2 when the lock was taken over from a dead worker (its sync was
/// cut short: this one does it all again), or 1 when another worker still
/// holds the lock after `wait_ms` (nothing listed), or `CODE_BAD_ARGUMENT`.
///
/// # Safety
///
/// `engine` is null or from [`rc_engine_attach`]; `out`, `count`, `written`
/// writable;
/// `store` null, or nginx's store function with `zone` a shared dict's.
#[no_mangle]
pub unsafe extern "C" fn rc_counter_sync_begin(
    engine: *mut Engine,
    wait_ms: u32,
    zone: *mut c_void,
    store: Option<ShdictStore>,
    out: *mut *const Changed,
    count: *mut u32,
    written: *mut u32,
) -> i32 {
    let (engine, out, count, written) = match (
        engine.as_mut(),
        out.as_mut(),
        count.as_mut(),
        written.as_mut(),
    ) {
        (Some(engine), Some(out), Some(count), Some(written)) => (engine, out, count, written),
        _ => return CODE_BAD_ARGUMENT,
    };
    *count = 0;
    *written = 0;
    guarded(CODE_INTERNAL, || {
        let taken = match take_waiting(engine.table.lock_word(MIRROR_LOCK), wait_ms) {
            Some(taken) => taken,
            None => return 1,
        };
        let Engine {
            table,
            offsets,
            changed: listed,
            ..
        } = engine;
        listed.clear();
        let dict = store.map(|store| DictStore { zone, store });
        let mut wrote = 0;
        listed.extend(
            table
                .records_in_arena_order(offsets)
                .filter_map(changed)
                .filter(|change| match dict {
                    Some(dict) if dict.write(change) => {
                        wrote += 1;
                        false
                    }
                    _ => true,
                }),
        );
        *written = wrote;
        *out = listed.as_ptr();
        *count = listed.len() as u32;
        match taken {
            Taken::Free => 0,
            Taken::FromDead(_) => 2,
        }
    })
}

/// Takes `lock`, waiting up to `wait_ms` while another live process holds
/// it; `None` when it is still held then, or held by this process (a second
/// light thread of it, which cannot finish while we wait).
fn take_waiting(lock: &AtomicU64, wait_ms: u32) -> Option<Taken> {
    let deadline = Instant::now() + Duration::from_millis(u64::from(wait_ms));
    let me = me();
    loop {
        match lock::try_lock(lock, me, alive) {
            Ok(taken) => return Some(taken),
            Err(holder) if holder == me || Instant::now() >= deadline => return None,
            Err(_) => std::thread::sleep(Duration::from_micros(100)),
        }
    }
}

/// Records that the dict now holds `value` for a listed counter.
///
/// # Safety
///
/// As [`rc_counter_add`], between [`rc_counter_sync_begin`] and
/// [`rc_counter_sync_end`].
#[no_mangle]
pub unsafe extern "C" fn rc_counter_mirrored(cells: *const AtomicU64, value: f64) {
    if let Some(counter) = counter_at(cells) {
        counter.set_mirror(value);
    }
}

/// Ends a sync: releases the mirror lock. 1, or 0 when this worker did not
/// hold it.
///
/// # Safety
///
/// `engine` is null or from [`rc_engine_attach`].
#[no_mangle]
pub unsafe extern "C" fn rc_counter_sync_end(engine: *mut Engine) -> i32 {
    match engine.as_ref() {
        Some(engine) => i32::from(lock::unlock(engine.table.lock_word(MIRROR_LOCK), me())),
        None => 0,
    }
}

/// The request path's [`Roller`]: this process and `kill(pid, 0)`; the
/// default waits while another worker rolls a slot.
struct Worker;

impl Roller for Worker {
    fn me(&self) -> Holder {
        me()
    }

    fn alive(&self, pid: u32) -> bool {
        alive(pid)
    }
}

/// The layout of this engine's request records for a ring of `ring`
/// windows: 1 with histograms, 0 without (the engine is too small for
/// [`requests::MIN_KEYS_WITH_HISTOGRAM`] of them), `CODE_BAD_ARGUMENT`.
///
/// # Safety
///
/// `engine` is null or from [`rc_engine_attach`].
#[no_mangle]
pub unsafe extern "C" fn rc_requests_layout(engine: *const Engine, ring: u32) -> i32 {
    match engine.as_ref() {
        Some(engine) => match Layout::for_arena(ring as usize, engine.table.stats().arena_total) {
            Some(layout) => i32::from(layout.has_histogram()),
            None => CODE_BAD_ARGUMENT,
        },
        None => CODE_BAD_ARGUMENT,
    }
}

/// The cells of request key `key`'s record, for a ring of `ring` windows
/// with histograms when `histogram` is non-zero (as
/// [`rc_requests_layout`] said), made when it has none. A new key other
/// than "all" and the overflow key (`capped` zero) takes a place among
/// `max_keys`.
///
/// # Errors
///
/// Returns 1 when this call made it, 0 when it existed, `CODE_KEYS_FULL`
/// when `max_keys` keys are registered, or `CODE_FULL`,
/// `CODE_KEY_TOO_LONG`, `CODE_WIDTH_MISMATCH` (the key has a record of
/// another ring: another `previous`), `CODE_BAD_ARGUMENT`.
///
/// # Safety
///
/// `engine` is null or from [`rc_engine_attach`]; `key` points to `len`
/// readable bytes; `cells` is writable.
#[no_mangle]
pub unsafe extern "C" fn rc_requests_key(
    engine: *mut Engine,
    key: *const u8,
    len: usize,
    ring: u32,
    histogram: i32,
    max_keys: u32,
    capped: i32,
    cells: *mut *const AtomicU64,
) -> i32 {
    let (engine, cells) = match key_call(engine, key, len, cells) {
        Some(both) => both,
        None => return CODE_BAD_ARGUMENT,
    };
    let layout = match Layout::new(ring as usize, histogram != 0) {
        Some(layout) => layout,
        None => return CODE_BAD_ARGUMENT,
    };
    guarded(CODE_INTERNAL, || {
        engine.set_key(requests::KIND, key_bytes(key, len));
        let width = layout.width();
        let table = &engine.table;
        let found = match table.lookup(&engine.key) {
            Some(record) if record.width() == width => Ok((record, false)),
            Some(record) => Err(Error::WidthMismatch {
                found: record.width(),
            }),
            None if capped == 0 => table.get_or_insert(&engine.key, width),
            None => {
                let keys = match table.get_or_insert(requests::KEYS_KEY, 1) {
                    Ok((record, _)) => &record.cells()[0],
                    Err(e) => return code_of(e),
                };
                if !requests::register(keys, u64::from(max_keys)) {
                    return CODE_KEYS_FULL;
                }
                let made = table.get_or_insert(&engine.key, width);
                if !matches!(made, Ok((_, true))) {
                    // Made by another worker meanwhile, or not at all.
                    requests::unregister(keys);
                }
                made
            }
        };
        match found {
            Ok((record, made)) => {
                *cells = record.cells().as_ptr();
                i32::from(made)
            }
            Err(e) => code_of(e),
        }
    })
}

/// Records one request of `latency_ms` in window `window` (the request's
/// start time over the window length, floored): the request path.
///
/// # Errors
///
/// 0 (in the window), 1 (in the total only: the slot holds a newer
/// window), or `CODE_BAD_ARGUMENT`.
///
/// # Safety
///
/// `cells` is null or from [`rc_requests_key`] with this `ring` and
/// `histogram`.
#[no_mangle]
pub unsafe extern "C" fn rc_requests_record(
    cells: *const AtomicU64,
    ring: u32,
    histogram: i32,
    window: u64,
    latency_ms: f64,
) -> i32 {
    let layout = match Layout::new(ring as usize, histogram != 0) {
        Some(layout) if !cells.is_null() => layout,
        _ => return CODE_BAD_ARGUMENT,
    };
    let cells = std::slice::from_raw_parts(cells, layout.width() as usize);
    match Requests::new(cells, layout) {
        Some(record) => match record.record(window, latency_ms, &Worker) {
            Recorded::Window => IN_WINDOW,
            Recorded::TotalOnly => TOTAL_ONLY,
        },
        None => CODE_BAD_ARGUMENT,
    }
}

/// How many keys are registered against `max_keys` (0 for null).
///
/// # Safety
///
/// `engine` is null or from [`rc_engine_attach`].
#[no_mangle]
pub unsafe extern "C" fn rc_requests_tracked(engine: *const Engine) -> u64 {
    match engine.as_ref() {
        Some(engine) => engine
            .table
            .lookup(requests::KEYS_KEY)
            .filter(|record| record.width() == 1)
            .map_or(0, |record| record.cells()[0].load(Relaxed)),
        None => 0,
    }
}

fn add_to_report(report: &mut Report, key: &[u8], record: &Requests<'_, AtomicU64>, now: u64) {
    let windows = (0..=report.previous())
        .map(|age| {
            now.checked_sub(age as u64)
                .and_then(|window| record.window_summary(window))
                .unwrap_or_default()
        })
        .collect();
    report.add(key, windows, record.total());
}

/// A report of every request key recorded at least once (or of `key`
/// alone when `single` is non-zero; empty when it has no record) at `now`
/// over windows of `window` seconds, for a ring of `ring` windows
/// (`previous` + 1) with histograms or not, as [`rc_requests_layout`]
/// says. Null for bad arguments. Every key's report takes the records
/// published now, read by [`rc_requests_report_walk`] (a few at a time if
/// need be); `key`'s is read at once. Rendered with
/// [`crate::ffi::rc_report_begin_json`] and the like, freed with
/// [`crate::ffi::rc_report_free`].
///
/// # Safety
///
/// `engine` is null or from [`rc_engine_attach`]; `key` points to `len`
/// readable bytes.
#[no_mangle]
pub unsafe extern "C" fn rc_requests_report(
    engine: *mut Engine,
    ring: u32,
    histogram: i32,
    window: u32,
    now: f64,
    key: *const u8,
    len: usize,
    single: i32,
) -> *mut Report {
    let (engine, layout) = match (engine.as_mut(), Layout::new(ring as usize, histogram != 0)) {
        (Some(engine), Some(layout)) if !key.is_null() || len == 0 => (engine, layout),
        _ => return std::ptr::null_mut(),
    };
    guarded(std::ptr::null_mut(), || {
        let mut report = match Report::new(u64::from(window), now, ring as usize - 1) {
            Ok(report) => report,
            Err(_) => return std::ptr::null_mut(),
        };
        let current = (now / f64::from(window)).floor() as u64;
        if single != 0 {
            let key = key_bytes(key, len);
            engine.set_key(requests::KIND, key);
            let found = engine.table.lookup(&engine.key);
            match found.and_then(|r| Requests::new(r.cells(), layout)) {
                Some(record) => add_to_report(&mut report, key, &record, current),
                None => report.add(key, Vec::new(), Default::default()),
            }
        } else {
            let address = engine as *const Engine as usize;
            let slots = engine.table.index_slots();
            report.walk = Some(Walk::new(address, layout, current, slots));
        }
        Box::into_raw(Box::new(report))
    })
}

/// Index slots a walk's step scans per record it may read: a slot costs
/// some 1/100 of a record.
const SLOTS_PER_RECORD: usize = 256;

/// Reads up to `max_records` more of the records (0: all) into a report
/// of every key from [`rc_requests_report`] on this engine (the first
/// steps scan the index for them): 1 when all are read (at once for a
/// report of one key), 0 when some are left,
/// `CODE_BAD_ARGUMENT` (null, or another engine's report), `CODE_INTERNAL`
/// on a caught panic. Each key is read whole in one call: its windows and
/// total are one snapshot.
///
/// # Safety
///
/// `engine` is null or from [`rc_engine_attach`]; `report` is null or
/// live.
#[no_mangle]
pub unsafe extern "C" fn rc_requests_report_walk(
    engine: *const Engine,
    report: *mut Report,
    max_records: u32,
) -> i32 {
    let (engine, report) = match (engine.as_ref(), report.as_mut()) {
        (Some(engine), Some(report)) => (engine, report),
        _ => return CODE_BAD_ARGUMENT,
    };
    let mut walk = match report.walk.take() {
        Some(walk) if walk.engine == engine as *const Engine as usize => walk,
        Some(walk) => {
            report.walk = Some(walk);
            return CODE_BAD_ARGUMENT;
        }
        None => return 1,
    };
    guarded(CODE_INTERNAL, || {
        let max = if max_records == 0 {
            usize::MAX
        } else {
            max_records as usize
        };
        if !walk.scanned() {
            // A step of the index scan: some 0.1 ms a step of 1,000.
            let table = &engine.table;
            walk.scan(max.saturating_mul(SLOTS_PER_RECORD), |slots, offsets| {
                table.offsets_in_slots(slots, offsets)
            });
            if !walk.scanned() {
                report.walk = Some(walk);
                return 0;
            }
        }
        let width = walk.layout.width();
        for offset in walk.take(max) {
            let record = engine.table.record_in_arena(offset);
            let key = record.key_bytes();
            if record.width() != width || !requests::is_request_key(key) {
                continue;
            }
            // A key made and never recorded (the overflow key, made in
            // advance) is not shown.
            match Requests::new(record.cells(), walk.layout) {
                Some(cells) if cells.total().count > 0 => {
                    add_to_report(report, &key[1..], &cells, walk.current)
                }
                _ => {}
            }
        }
        if walk.done() {
            1
        } else {
            report.walk = Some(walk);
            0
        }
    })
}

/// The cells of a lax key's record (`journal` zero) or of a lax counter's
/// journal (non-zero), for [`rc_engine_record`].
#[no_mangle]
pub extern "C" fn rc_lax_width(journal: i32) -> u32 {
    if journal == 0 {
        lax::WIDTH
    } else {
        lax::JOURNAL_WIDTH
    }
}

/// # Safety
///
/// `cells` is null or a lax key's cells from [`rc_engine_record`].
unsafe fn lax_key_at<'a>(cells: *const AtomicU64) -> Option<lax::Key<'a, AtomicU64>> {
    if cells.is_null() {
        None
    } else {
        Some(lax::Key::new(std::slice::from_raw_parts(
            cells,
            lax::WIDTH as usize,
        )))
    }
}

/// # Safety
///
/// `cells` is null or a lax journal's cells from [`rc_engine_record`].
unsafe fn lax_journal_at<'a>(cells: *const AtomicU64) -> Option<lax::Journal<'a, AtomicU64>> {
    if cells.is_null() {
        None
    } else {
        lax::Journal::new(std::slice::from_raw_parts(
            cells,
            lax::JOURNAL_WIDTH as usize,
        ))
        .ok()
    }
}

/// Adds `step` to a lax key (an inc or a dec): the request path. What
/// every worker has added and not yet sent goes to `*unsent`.
///
/// # Errors
///
/// 0, or `CODE_OVERFLOW` (the total would leave the `i64` range; nothing
/// changed), `CODE_BAD_ARGUMENT`.
///
/// # Safety
///
/// `cells` is null or a lax key's cells from [`rc_engine_record`];
/// `unsent` is writable.
#[no_mangle]
pub unsafe extern "C" fn rc_lax_add(cells: *const AtomicU64, step: i64, unsent: *mut i64) -> i32 {
    match (lax_key_at(cells), unsent.as_mut()) {
        (Some(key), Some(unsent)) => match key.add(step) {
            Ok(now) => {
                *unsent = now;
                0
            }
            Err(_) => CODE_OVERFLOW,
        },
        _ => CODE_BAD_ARGUMENT,
    }
}

/// What every worker has added to a lax key and not yet sent (0 for null).
///
/// # Safety
///
/// As [`rc_lax_add`].
#[no_mangle]
pub unsafe extern "C" fn rc_lax_unsent(cells: *const AtomicU64) -> i64 {
    lax_key_at(cells).map_or(0, |key| key.unsent())
}

/// Asks for `ms` as the key's TTL if a flush creates it in Redis (the
/// first request stands until sent).
///
/// # Safety
///
/// As [`rc_lax_add`].
#[no_mangle]
pub unsafe extern "C" fn rc_lax_request_ttl(cells: *const AtomicU64, ms: u64) {
    if let Some(key) = lax_key_at(cells) {
        key.request_ttl(ms);
    }
}

/// The key's Redis value as last seen into `*value`: 1, or 0 when none
/// was seen yet.
///
/// # Safety
///
/// As [`rc_lax_add`]; `value` is writable.
#[no_mangle]
pub unsafe extern "C" fn rc_lax_seen(cells: *const AtomicU64, value: *mut i64) -> i32 {
    match (lax_key_at(cells).and_then(|key| key.seen()), value.as_mut()) {
        (Some(seen), Some(value)) => {
            *value = seen;
            1
        }
        _ => 0,
    }
}

/// Records a Redis value of the key just seen.
///
/// # Safety
///
/// As [`rc_lax_add`].
#[no_mangle]
pub unsafe extern "C" fn rc_lax_set_seen(cells: *const AtomicU64, value: i64) {
    if let Some(key) = lax_key_at(cells) {
        key.set_seen(value);
    }
}

/// A batch of a lax flush, from [`rc_lax_flush_begin`]: its id is built
/// from `nonce` and `seq`.
#[repr(C)]
pub struct LaxBatch {
    pub nonce: u64,
    pub seq: u64,
    pub count: u32,
    /// 1 when the flush goes on after this batch, from index slot `next`
    /// (the walk stopped there, or this was a batch left in flight).
    pub more: u32,
    pub next: u32,
}

/// One key of a batch, from [`rc_lax_flush_entry`].
#[repr(C)]
pub struct LaxEntry {
    /// The key's cells (for [`rc_lax_set_seen`]).
    pub cells: *const AtomicU64,
    /// The key without its kind and counter name, in the region.
    pub key: *const u8,
    pub key_len: u32,
    pub delta: i64,
    /// The TTL (ms) to give the key if the batch creates it; 0: none.
    pub ttl_ms: u64,
}

/// [`rc_lax_flush_begin`]: a new batch is in flight.
pub const LAX_NEW_BATCH: i32 = 0;
/// [`rc_lax_flush_begin`]: another live worker (or light thread) flushes.
pub const LAX_BUSY: i32 = 1;
/// [`rc_lax_flush_begin`]: the batch an earlier flush left in flight, to
/// send again under its id.
pub const LAX_LEFT_BATCH: i32 = 2;
/// [`rc_lax_flush_begin`]: nothing to send; the lock is released.
pub const LAX_NOTHING: i32 = 3;

/// The counter's prefix (its keys' kind, then `name`: the Lua side's
/// namespace with a separator) into `engine.key`.
fn lax_prefix(engine: &mut Engine, name: &[u8]) {
    engine.set_key(lax::KIND, name);
}

/// Starts a flush of the lax counter `name` whose journal is `journal`:
/// takes its lock and puts a batch in flight, the one an earlier flush
/// left (sent again first, under its id) or a new one of the keys that
/// have something to send (at most `lax::MAX_BATCH`, in index order from
/// slot `from`: 0 for a flush's first batch, then the `next` of the one
/// before). Its figures go to `*out`; its keys are read with
/// [`rc_lax_flush_entry`]; [`rc_lax_flush_end`] ends it.
///
/// # Errors
///
/// `LAX_NEW_BATCH`, `LAX_LEFT_BATCH`, `LAX_NOTHING`, `LAX_BUSY` (never
/// waits), or `CODE_BAD_ARGUMENT`.
///
/// # Safety
///
/// `engine` is null or from [`rc_engine_attach`]; `journal` null or a lax
/// journal's cells from it; `name` points to `len` readable bytes; `out`
/// is writable.
#[no_mangle]
pub unsafe extern "C" fn rc_lax_flush_begin(
    engine: *mut Engine,
    journal: *const AtomicU64,
    name: *const u8,
    len: usize,
    from: u32,
    out: *mut LaxBatch,
) -> i32 {
    let (engine, journal, out) = match (engine.as_mut(), lax_journal_at(journal), out.as_mut()) {
        (Some(engine), Some(journal), Some(out)) if !name.is_null() || len == 0 => {
            (engine, journal, out)
        }
        _ => return CODE_BAD_ARGUMENT,
    };
    *out = LaxBatch {
        nonce: 0,
        seq: 0,
        count: 0,
        more: 0,
        next: 0,
    };
    guarded(CODE_INTERNAL, || {
        if take_waiting(journal.lock_word(), 0).is_none() {
            return LAX_BUSY;
        }
        let nonce = journal.nonce(random_u64());
        let (found, more, next) = if journal.in_flight() != 0 {
            (LAX_LEFT_BATCH, 1, from)
        } else {
            lax_prefix(engine, key_bytes(name, len));
            let Engine {
                table,
                key: prefix,
                offsets,
                ..
            } = engine;
            // In index order from slot `from`: one walk of the index per
            // flush, however many batches it takes (each batch going on
            // where the last stopped).
            let slots = table.index_slots();
            let at = std::cell::Cell::new(0);
            let keys = (from as usize..slots).filter_map(|slot| {
                offsets.clear();
                table.offsets_in_slots(slot..slot + 1, offsets);
                let offset = *offsets.first()?;
                let record = table.record_in_arena(offset);
                at.set(slot);
                (record.width() == lax::WIDTH && record.key_bytes().starts_with(prefix))
                    .then(|| (u64::from(offset), lax::Key::new(record.cells())))
            });
            if journal.build(keys) == 0 {
                lock::unlock(journal.lock_word(), me());
                return LAX_NOTHING;
            }
            // A full batch stopped at (or just past) the slot last read.
            let full = journal.len() == lax::MAX_BATCH;
            (LAX_NEW_BATCH, u32::from(full), at.get() as u32)
        };
        *out = LaxBatch {
            nonce,
            seq: journal.in_flight(),
            count: journal.len() as u32,
            more,
            next,
        };
        found
    })
}

/// Key `i` of the batch in flight into `*out`, the key without the
/// counter's prefix (`prefix_len` bytes: the kind byte and `name`).
///
/// # Errors
///
/// 0, or `CODE_NOT_FOUND` (no such entry, or no record at its offset: the
/// entry is skipped, here and when the batch ends), `CODE_BAD_ARGUMENT`.
///
/// # Safety
///
/// As [`rc_lax_flush_begin`]; between it and [`rc_lax_flush_end`].
#[no_mangle]
pub unsafe extern "C" fn rc_lax_flush_entry(
    engine: *const Engine,
    journal: *const AtomicU64,
    i: u32,
    prefix_len: u32,
    out: *mut LaxEntry,
) -> i32 {
    let (engine, journal, out) = match (engine.as_ref(), lax_journal_at(journal), out.as_mut()) {
        (Some(engine), Some(journal), Some(out)) => (engine, journal, out),
        _ => return CODE_BAD_ARGUMENT,
    };
    if i as usize >= journal.len() {
        return CODE_NOT_FOUND;
    }
    let entry = journal.entry(i as usize);
    let record = match engine.table.record(entry.offset as usize) {
        Ok(record) if record.width() == lax::WIDTH => record,
        _ => return CODE_NOT_FOUND,
    };
    let key = record.key_bytes();
    let skip = (prefix_len as usize).min(key.len());
    *out = LaxEntry {
        cells: record.cells().as_ptr(),
        key: key[skip..].as_ptr(),
        key_len: (key.len() - skip) as u32,
        delta: entry.delta,
        ttl_ms: entry.ttl,
    };
    0
}

/// [`rc_lax_flush_end`]'s outcomes, as [`lax::Outcome`].
pub const LAX_APPLIED: i32 = 0;
pub const LAX_UNKNOWN: i32 = 1;
pub const LAX_NOT_SENT: i32 = 2;

/// Ends a flush's batch: `LAX_APPLIED` moves its keys' sent totals and
/// clears the journal, `LAX_UNKNOWN` keeps it in flight (the next flush
/// sends it again under its id), `LAX_NOT_SENT` clears it (its deltas stay
/// unsent); then releases the lock. 1, or 0 when this worker did not hold
/// the lock (it was taken over: nothing done).
///
/// # Safety
///
/// As [`rc_lax_flush_begin`].
#[no_mangle]
pub unsafe extern "C" fn rc_lax_flush_end(
    engine: *const Engine,
    journal: *const AtomicU64,
    outcome: i32,
) -> i32 {
    let (engine, journal) = match (engine.as_ref(), lax_journal_at(journal)) {
        (Some(engine), Some(journal)) => (engine, journal),
        _ => return 0,
    };
    let outcome = match outcome {
        LAX_APPLIED => lax::Outcome::Applied,
        LAX_NOT_SENT => lax::Outcome::NotSent,
        _ => lax::Outcome::Unknown,
    };
    if lock::holder(journal.lock_word()) != Some(me()) {
        return 0;
    }
    let table = &engine.table;
    journal.settle(outcome, |offset| match table.record(offset as usize) {
        Ok(record) if record.width() == lax::WIDTH => Some(lax::Key::new(record.cells())),
        _ => None,
    });
    i32::from(lock::unlock(journal.lock_word(), me()))
}

/// Drops what is unsent of one lax key (`cells`), or of every key of the
/// counter `name` (`cells` null), as a strict set, delete or clear makes
/// it moot: under the counter's lock, with no batch in flight.
///
/// # Errors
///
/// 0, or `LAX_BUSY` (the lock is held, or a batch is in flight: nothing
/// dropped), `CODE_BAD_ARGUMENT`.
///
/// # Safety
///
/// As [`rc_lax_flush_begin`]; `cells` null or a lax key's cells.
#[no_mangle]
pub unsafe extern "C" fn rc_lax_forget(
    engine: *mut Engine,
    journal: *const AtomicU64,
    cells: *const AtomicU64,
    name: *const u8,
    len: usize,
) -> i32 {
    let (engine, journal) = match (engine.as_mut(), lax_journal_at(journal)) {
        (Some(engine), Some(journal)) if !name.is_null() || len == 0 => (engine, journal),
        _ => return CODE_BAD_ARGUMENT,
    };
    guarded(CODE_INTERNAL, || {
        if take_waiting(journal.lock_word(), 0).is_none() {
            return LAX_BUSY;
        }
        let busy = journal.in_flight() != 0;
        if !busy {
            if let Some(key) = lax_key_at(cells) {
                key.forget();
            } else {
                lax_prefix(engine, key_bytes(name, len));
                let Engine {
                    table, key: prefix, ..
                } = engine;
                for record in table.records() {
                    if record.width() == lax::WIDTH && record.key_bytes().starts_with(prefix) {
                        lax::Key::new(record.cells()).forget();
                    }
                }
            }
        }
        lock::unlock(journal.lock_word(), me());
        if busy {
            LAX_BUSY
        } else {
            0
        }
    })
}

/// How many keys of the lax counter `name` have something unsent (every
/// worker's), for self-metrics.
///
/// # Safety
///
/// `engine` is null or from [`rc_engine_attach`]; `name` points to `len`
/// readable bytes.
#[no_mangle]
pub unsafe extern "C" fn rc_lax_unsent_keys(
    engine: *mut Engine,
    name: *const u8,
    len: usize,
) -> u32 {
    let engine = match engine.as_mut() {
        Some(engine) if !name.is_null() || len == 0 => engine,
        _ => return 0,
    };
    guarded(0, || {
        lax_prefix(engine, key_bytes(name, len));
        let prefix = &engine.key;
        engine
            .table
            .records()
            .filter(|record| {
                record.width() == lax::WIDTH
                    && record.key_bytes().starts_with(prefix)
                    && lax::Key::new(record.cells()).unsent() != 0
            })
            .count() as u32
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn a_lock_holder_is_alive_while_a_process_of_this_master() {
        let me = std::process::id();
        let master = unsafe { libc::getppid() } as u32;
        assert!(alive(me));
        assert!(alive(master));
        assert!(!alive(0));
        assert!(!alive(u32::MAX));
    }

    #[test]
    fn a_pid_come_round_to_another_process_is_no_holder() -> std::io::Result<()> {
        // A child of this process stands for a process that got a dead
        // worker's pid: it exists, but its parent is not our master.
        let mut stranger = Command::new("sleep").arg("30").spawn()?;
        let pid = stranger.id();
        let seen = alive(pid);
        stranger.kill()?;
        stranger.wait()?;
        assert!(!seen, "a live process of another parent taken for a holder");
        assert!(!alive(pid), "a reaped process taken for a holder");
        Ok(())
    }
}
