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
use crate::engine::lock::{self, Holder, Taken};
use crate::engine::requests::{self, Layout, Recorded, Requests, Roller};
use crate::engine::table::{Record, Table};
use crate::engine::zone::{self, SlabApi};
use crate::engine::Error;
use crate::ffi::guarded;
use crate::histogram::{check_edges, edge_ms, Summary, MAX_EDGES};
use crate::stats::{Report, Walk};

/// The version of the declarations below, checked by the Lua side.
pub const ENGINE_ABI_VERSION: i32 = 5;

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
/// The engine's request records count at other Prometheus edges than the
/// ones given ([`rc_requests_edges`]).
pub const CODE_EDGES_MISMATCH: i32 = -27;

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
/// windows and `edges` Prometheus edges: 1 with histograms, 0 without
/// (the engine is too small for [`requests::MIN_KEYS_WITH_HISTOGRAM`] of
/// them), `CODE_BAD_ARGUMENT`.
///
/// # Safety
///
/// `engine` is null or from [`rc_engine_attach`].
#[no_mangle]
pub unsafe extern "C" fn rc_requests_layout(engine: *const Engine, ring: u32, edges: u32) -> i32 {
    let arena = |engine: &Engine| engine.table.stats().arena_total;
    match engine.as_ref() {
        Some(engine) => match Layout::for_arena(ring as usize, edges as usize, arena(engine)) {
            Some(layout) => i32::from(layout.has_histogram()),
            None => CODE_BAD_ARGUMENT,
        },
        None => CODE_BAD_ARGUMENT,
    }
}

/// The Prometheus edges `edges` (`count` of them, seconds, as
/// [`check_edges`] wants them) as this engine's request records' edges:
/// the first caller's are the engine's (a fingerprint of them, in the
/// record of [`requests::EDGES_KEY`]), the later ones must be the same.
///
/// # Errors
///
/// 0, or `CODE_EDGES_MISMATCH` (the engine has other edges),
/// `CODE_BAD_ARGUMENT` (null, or edges [`check_edges`] refuses),
/// `CODE_FULL`.
///
/// # Safety
///
/// `engine` is null or from [`rc_engine_attach`]; `edges` points to
/// `count` readable doubles.
#[no_mangle]
pub unsafe extern "C" fn rc_requests_edges(
    engine: *const Engine,
    edges: *const f64,
    count: u32,
) -> i32 {
    let engine = match engine.as_ref() {
        Some(engine) if !edges.is_null() => engine,
        _ => return CODE_BAD_ARGUMENT,
    };
    let edges = std::slice::from_raw_parts(edges, count as usize);
    if !check_edges(edges) {
        return CODE_BAD_ARGUMENT;
    }
    guarded(CODE_INTERNAL, || {
        match engine.table.get_or_insert(requests::EDGES_KEY, 1) {
            Ok((record, _)) => match requests::claim_edges(&record.cells()[0], edges) {
                true => 0,
                false => CODE_EDGES_MISMATCH,
            },
            Err(e) => code_of(e),
        }
    })
}

/// The cells of request key `key`'s record, for a ring of `ring` windows
/// with histograms when `histogram` is non-zero (as
/// [`rc_requests_layout`] said) and `edges` Prometheus edges, made when it
/// has none. A new key other
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
    edges: u32,
    max_keys: u32,
    capped: i32,
    cells: *mut *const AtomicU64,
) -> i32 {
    let (engine, cells) = match key_call(engine, key, len, cells) {
        Some(both) => both,
        None => return CODE_BAD_ARGUMENT,
    };
    let layout = match Layout::with_edges(ring as usize, histogram != 0, edges as usize) {
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

/// The shape of a request counter's records, as its worker passes it on
/// the request path: one pointer instead of four arguments.
#[repr(C)]
pub struct RequestsShape {
    /// `previous` + 1 windows.
    pub ring: u32,
    /// Non-zero: records with histograms ([`rc_requests_layout`]).
    pub histogram: i32,
    /// How many Prometheus edges, in `edges_ms`.
    pub edges: u32,
    pub reserved: u32,
    /// The edges in milliseconds ([`edge_ms`] of the seconds given to
    /// [`rc_requests_edges`]), ascending.
    pub edges_ms: [f64; MAX_EDGES],
}

/// Records one request of `latency_ms` in window `window` (the request's
/// start time over the window length, floored) in a record of `shape`:
/// the request path.
///
/// # Errors
///
/// 0 (in the window), 1 (in the total only: the slot holds a newer
/// window), or `CODE_BAD_ARGUMENT`.
///
/// # Safety
///
/// `cells` is null or from [`rc_requests_key`] with `shape`'s ring,
/// histogram and edges; `shape` is null or readable.
#[no_mangle]
pub unsafe extern "C" fn rc_requests_record(
    cells: *const AtomicU64,
    shape: *const RequestsShape,
    window: u64,
    latency_ms: f64,
) -> i32 {
    let shape = match shape.as_ref() {
        Some(shape) if !cells.is_null() => shape,
        _ => return CODE_BAD_ARGUMENT,
    };
    let layout = match Layout::with_edges(
        shape.ring as usize,
        shape.histogram != 0,
        shape.edges as usize,
    ) {
        Some(layout) => layout,
        None => return CODE_BAD_ARGUMENT,
    };
    let cells = std::slice::from_raw_parts(cells, layout.width() as usize);
    match Requests::with_edges(cells, layout, &shape.edges_ms[..layout.edges()]) {
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
    engine.as_ref().map_or(0, registered)
}

fn registered(engine: &Engine) -> u64 {
    engine
        .table
        .lookup(requests::KEYS_KEY)
        .filter(|record| record.width() == 1)
        .map_or(0, |record| record.cells()[0].load(Relaxed))
}

/// What adding a key to a report reuses, key after key.
#[derive(Default)]
struct Scratch {
    windows: Vec<Summary>,
    at_or_below: Vec<u64>,
}

fn add_to_report(
    report: &mut Report,
    key: &[u8],
    record: &Requests<'_, AtomicU64>,
    now: u64,
    scratch: &mut Scratch,
) {
    scratch.windows.clear();
    scratch.windows.extend((0..=report.previous()).map(|age| {
        now.checked_sub(age as u64)
            .and_then(|window| record.window_summary(window))
            .unwrap_or_default()
    }));
    let (count, sum) = record.total_into(&mut scratch.at_or_below);
    report.add_parts(key, &scratch.windows, count, sum, &scratch.at_or_below);
}

/// A report of every request key recorded at least once (or of `key`
/// alone when `single` is non-zero; empty when it has no record) at `now`
/// over windows of `window` seconds, for a ring of `ring` windows
/// (`previous` + 1) with histograms or not, as [`rc_requests_layout`]
/// says, and the Prometheus edges `edges` (`count` of them, seconds, as
/// given to [`rc_requests_edges`]). Null for bad arguments. Every key's report takes the records
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
    edges: *const f64,
    count: u32,
    window: u32,
    now: f64,
    key: *const u8,
    len: usize,
    single: i32,
) -> *mut Report {
    let layout = Layout::with_edges(ring as usize, histogram != 0, count as usize);
    let (engine, layout) = match (engine.as_mut(), layout) {
        (Some(engine), Some(layout)) if (!key.is_null() || len == 0) && !edges.is_null() => {
            (engine, layout)
        }
        _ => return std::ptr::null_mut(),
    };
    let edges = std::slice::from_raw_parts(edges, count as usize);
    guarded(std::ptr::null_mut(), || {
        let mut report = match Report::new(u64::from(window), now, ring as usize - 1) {
            Ok(report) => report,
            Err(_) => return std::ptr::null_mut(),
        };
        if report.set_edges(edges).is_err() {
            return std::ptr::null_mut();
        }
        let edges_ms: Vec<f64> = edges.iter().map(|&e| edge_ms(e)).collect();
        let current = (now / f64::from(window)).floor() as u64;
        if single != 0 {
            let key = key_bytes(key, len);
            engine.set_key(requests::KIND, key);
            let found = engine.table.lookup(&engine.key);
            match found.and_then(|r| Requests::with_edges(r.cells(), layout, &edges_ms)) {
                Some(record) => {
                    add_to_report(&mut report, key, &record, current, &mut Scratch::default())
                }
                None => report.add(key, Vec::new(), Default::default()),
            }
        } else {
            let address = engine as *const Engine as usize;
            let slots = engine.table.index_slots();
            // The keys registered against max_keys, "all" and the overflow
            // key: all there is to read, but for keys made meanwhile.
            report.reserve_keys(registered(engine) as usize + 2);
            report.walk = Some(Walk::new(address, layout, edges_ms, current, slots));
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
        let mut scratch = Scratch::default();
        for offset in walk.take(max) {
            let record = engine.table.record_in_arena(offset);
            let key = record.key_bytes();
            if record.width() != width || !requests::is_request_key(key) {
                continue;
            }
            // A key made and never recorded (the overflow key, made in
            // advance) is not shown.
            match Requests::with_edges(record.cells(), walk.layout, &walk.edges_ms) {
                Some(cells) if cells.recorded() => {
                    add_to_report(report, &key[1..], &cells, walk.current, &mut scratch)
                }
                _ => {}
            }
        }
        // This step's keys are sorted now; rendering merges the steps'.
        report.end_run();
        if walk.done() {
            1
        } else {
            report.walk = Some(walk);
            0
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::histogram::{DEFAULT_EDGES_S, PROMETHEUS_EDGES_MS};
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

    /// An engine over plain memory (as large as make bench's dicts) with
    /// `keys` request keys of one request each (12 ms), three windows with
    /// histograms: what make bench's growth scrapes.
    fn engine_of_keys(keys: usize) -> Engine {
        let words: &'static [AtomicU64] = Box::leak(
            (0..keys * 1375)
                .map(|_| AtomicU64::new(0))
                .collect::<Vec<_>>()
                .into_boxed_slice(),
        );
        let mut engine = Engine {
            table: Table::init(words, [1, 2], 7).unwrap(),
            bytes: words.len() * 8,
            key: Vec::new(),
            changed: Vec::new(),
            offsets: Vec::new(),
        };
        let edges = PROMETHEUS_EDGES_MS.len() as u32;
        let mut shape = RequestsShape {
            ring: 3,
            histogram: 1,
            edges,
            reserved: 0,
            edges_ms: [0.0; MAX_EDGES],
        };
        shape.edges_ms[..11].copy_from_slice(&PROMETHEUS_EDGES_MS);
        let mut cells = std::ptr::null();
        for i in 1..=keys {
            let key = format!("/path/{}", i);
            unsafe {
                let made = rc_requests_key(
                    &mut engine,
                    key.as_ptr(),
                    key.len(),
                    3,
                    1,
                    edges,
                    keys as u32,
                    1,
                    &mut cells,
                );
                assert!(made >= 0, "{}", made);
                let rc = rc_requests_record(cells, &shape, 27_000_000, 12.0);
                assert_eq!(rc, 0);
            }
        }
        engine
    }

    /// A report of every key of `engine`, walked in one step.
    fn walked(engine: &mut Engine, now: f64) -> Box<Report> {
        unsafe {
            let edges = DEFAULT_EDGES_S.len() as u32;
            let report = rc_requests_report(
                engine,
                3,
                1,
                DEFAULT_EDGES_S.as_ptr(),
                edges,
                60,
                now,
                b"".as_ptr(),
                0,
                0,
            );
            assert_eq!(rc_requests_report_walk(engine, report, 0), 1);
            Box::from_raw(report)
        }
    }

    /// Times scrapes of 10,000 and 100,000 keys in one call, by part (the
    /// walk, the JSON, the Prometheus text), best of 5: `cargo test
    /// --release --no-default-features scrape_timing -- --ignored
    /// --nocapture` (under `perf record` for a profile; SCRAPE_KEYS=n for
    /// one size only).
    #[test]
    #[ignore]
    fn scrape_timing() {
        let sizes = match std::env::var("SCRAPE_KEYS")
            .ok()
            .and_then(|n| n.parse().ok())
        {
            Some(keys) => vec![keys],
            None => vec![10_000, 100_000],
        };
        for keys in sizes {
            let mut engine = engine_of_keys(keys);
            let now = 27_000_000.0 * 60.0 + 1.5;
            let mut best = [Duration::MAX; 3];
            let mut bytes = [0; 2];
            for _ in 0..5 {
                let start = Instant::now();
                let mut report = walked(&mut engine, now);
                best[0] = best[0].min(start.elapsed());
                let start = Instant::now();
                bytes[0] = report.json(1.0, 2.0, false).len();
                best[1] = best[1].min(start.elapsed());
                let mut report = walked(&mut engine, now);
                let start = Instant::now();
                bytes[1] = report.prometheus("bench_stats_0_100000").len();
                best[2] = best[2].min(start.elapsed());
            }
            eprintln!(
                "{} keys: walk {:?}, JSON {:?} ({} B), Prometheus {:?} ({} B)",
                keys, best[0], best[1], bytes[0], best[2], bytes[1]
            );
        }
    }
}
