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

use crate::engine::counter::{self, Counter, SyncProgress};
use crate::engine::counter_text::{Labels, Render};
use crate::engine::heavy;
use crate::engine::lax;
use crate::engine::limit::{self, Rule};
use crate::engine::lock::{self, Holder, Taken};
use crate::engine::requests::{self, Layout, Recorded, Requests, Roller};
use crate::engine::strict::{self, AtomicPair, Batches, Change, Current, Pair, Refused};
use crate::engine::table::{self, Record, Table};
use crate::engine::zone::{self, SlabApi};
use crate::engine::Error;
use crate::ffi::guarded;
use crate::histogram::{check_edges, edge_ms, Summary, MAX_EDGES};
use crate::int64::{self, Cmp, Op, Outcome};
use crate::stats::{Report, Walk};

/// The version of the declarations below, checked by the Lua side.
pub const ENGINE_ABI_VERSION: i32 = 6;

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

/// The lock word that holds no lock but the mirror syncs' progress
/// ([`counter::SyncProgress`]), written by the mirror lock's holder.
const MIRROR_PROGRESS: usize = 1;

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
        // A new key that waited too long for the table lock is refused as
        // one with no room is: the request counter's overflow key.
        Error::Full | Error::Busy => CODE_FULL,
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
    /// A sync's scratch: record offsets, as the index holds them;
    offsets: Vec<u32>,
    /// ... then sorted (and then changes in the dict's order), with room
    /// for [`radix_sort`].
    order: Vec<u64>,
    scratch: Vec<u64>,
    /// The counter records a sync walks, in the dict's order, as the last
    /// scan of the index found them ...
    counters: Vec<Known>,
    /// ... while the table's records are as they were then
    /// ([`Table::records_mark`]): a sync scans the index only after a new
    /// key or a removal.
    counters_mark: Option<[u64; 2]>,
    /// The records' offsets the last request report's scan of the index
    /// found (sorted), and the records mark taken before it: a report
    /// made while the mark is the same reads these, with no scan of the
    /// index (its size is the dict's: 64 MB for a dict of 1100m). Set by
    /// a walk, which has the engine shared ([`rc_requests_report_walk`]).
    report_offsets: RefCell<(Option<[u64; 2]>, Vec<u32>)>,
}

impl Engine {
    fn new(table: Table<'static, AtomicU64>, bytes: usize) -> Engine {
        Engine {
            table,
            bytes,
            key: Vec::new(),
            changed: Vec::new(),
            offsets: Vec::new(),
            order: Vec::new(),
            scratch: Vec::new(),
            counters: Vec::new(),
            counters_mark: None,
            report_offsets: RefCell::new((None, Vec::new())),
        }
    }

    /// A handle on a table the caller laid over memory of its own, as
    /// [`rc_engine_attach`] gives one on a dict's zone: for the tests of
    /// several processes (tests/shared_sync.rs).
    #[doc(hidden)]
    pub fn over(table: Table<'static, AtomicU64>) -> Engine {
        let bytes = table.stats().arena_total as usize * 8;
        Engine::new(table, bytes)
    }

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
#[derive(Clone, Copy)]
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
                // New keys and removals take the table lock as this
                // process, and take it over from a dead worker.
                let table = region.table.with_owner(table::Process { me, alive });
                *engine = Box::into_raw(Box::new(Engine::new(table, region.bytes)));
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

/// The engine's epoch ([`Table::epoch`]): its low 32 bits, which the Lua
/// side reads before each write through the cells it keeps (a change: a
/// record was removed; it looks its keys up again). Null for null.
///
/// # Safety
///
/// `engine` is null or from [`rc_engine_attach`].
#[no_mangle]
pub unsafe extern "C" fn rc_engine_epoch(engine: *const Engine) -> *const u32 {
    match engine.as_ref() {
        // The low half of a little-endian word (table.rs refuses big-endian
        // machines).
        Some(engine) => engine.table.epoch_word() as *const AtomicU64 as *const u32,
        None => std::ptr::null(),
    }
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
    /// Records removed, made in a removed record's space, waiting for
    /// reuse (and their bytes); bytes of removed records never reused.
    pub removed: u64,
    pub reused: u64,
    pub free: u64,
    pub free_bytes: u64,
    pub leaked_bytes: u64,
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
        removed: stats.removed,
        reused: stats.reused,
        free: stats.free,
        free_bytes: stats.free_words * 8,
        leaked_bytes: stats.leaked * 8,
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

/// A counter record as a sync finds it: where its cells and key (without
/// the kind byte) are, and the hash the dict files the key under.
#[derive(Clone, Copy)]
struct Known {
    cells: *const AtomicU64,
    key: *const u8,
    key_len: u32,
    dict_hash: u32,
}

impl Known {
    /// None for a record of another kind than a counter's.
    fn of(record: Record<'static, AtomicU64>) -> Option<Known> {
        let key = record.key_bytes();
        if key.first() != Some(&counter::KIND) || record.width() != counter::WIDTH {
            return None;
        }
        Some(Known {
            cells: record.cells().as_ptr(),
            key: key[1..].as_ptr(),
            key_len: (key.len() - 1) as u32,
            dict_hash: counter::dict_hash(&key[1..]),
        })
    }

    /// Asks the hardware for the record's cells ahead of [`changed`].
    #[inline]
    fn prefetch(&self) {
        crate::engine::word::prefetch_ptr(self.cells);
    }
}

/// Lists the counter records of `table` in `counters`, in the dict's order
/// (of [`counter::dict_hash`]); the other arguments are scratch.
fn scan_counters(
    table: &Table<'static, AtomicU64>,
    offsets: &mut Vec<u32>,
    order: &mut Vec<u64>,
    scratch: &mut Vec<u64>,
    counters: &mut Vec<Known>,
) {
    offsets.clear();
    table.offsets_in_slots(0..table.index_slots(), offsets);
    // Read in arena order, which the hardware prefetches.
    order.clear();
    order.extend(offsets.iter().map(|&offset| u64::from(offset)));
    let max = offsets.iter().max().copied().unwrap_or(0);
    radix_sort(order, scratch, 0..32 - max.leading_zeros());
    let found: Vec<Known> = order
        .iter()
        .filter_map(|&offset| Known::of(table.record_in_arena(offset as u32)))
        .collect();
    order.clear();
    order.extend(
        found
            .iter()
            .enumerate()
            .map(|(i, known)| (u64::from(known.dict_hash) << 32) | i as u64),
    );
    radix_sort(order, scratch, 32..64);
    counters.clear();
    counters.extend(order.iter().map(|&place| found[place as u32 as usize]));
}

/// The change to copy for a counter, if its value is not what the dict
/// mirrors.
///
/// # Safety
///
/// `known` is from [`scan_counters`] on this engine's table (records are
/// never moved, and a removed one's space is not reused for a while: the
/// next sync scans again).
unsafe fn changed(known: &Known) -> Option<Changed> {
    let counter = counter_at(known.cells)?;
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
        cells: known.cells,
        key: known.key,
        key_len: known.key_len,
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
/// keys takes a few milliseconds. It ends early, with 0 and nothing listed
/// or written, once a sync that began after this call (so listed all it
/// must) has finished with nothing left for Lua ([`SyncProgress`]).
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
        let progress = SyncProgress::new(engine.table.lock_word(MIRROR_PROGRESS));
        let ticket = progress.ticket();
        let lock = engine.table.lock_word(MIRROR_LOCK);
        let taken = match take_unless(lock, wait_ms, || progress.covers(ticket)) {
            Wait::Taken(taken) => taken,
            // A sync begun after this call has copied everything.
            Wait::Done => return 0,
            Wait::Held => return 1,
        };
        let number = progress.begin();
        let Engine {
            table,
            offsets,
            order,
            scratch,
            changed: listed,
            counters,
            counters_mark,
            ..
        } = engine;
        // The mark before the scan: a record published after it moves the
        // next sync's mark on.
        let mark = table.records_mark();
        if mark.is_none() || mark != *counters_mark {
            scan_counters(table, offsets, order, scratch, counters);
            *counters_mark = mark;
        }
        listed.clear();
        let dict = store.map(|store| DictStore { zone, store });
        // Plain changes are written as they are found, in the order of the
        // dict's tree: each store's lookup walks from the last one's
        // neighbour, its path mostly still in the cache (100,000 keys, one
        // worker, runs side by side on a busy machine: 54 and 57 ms against
        // 82 in the order of the records).
        let mut wrote = 0;
        for (i, known) in counters.iter().enumerate() {
            if let Some(ahead) = counters.get(i + PREFETCH_AHEAD) {
                ahead.prefetch();
            }
            let change = match changed(known) {
                Some(change) => change,
                None => continue,
            };
            if let Some(dict) = dict {
                if dict.write(&change) {
                    wrote += 1;
                    continue;
                }
            }
            listed.push(change);
        }
        if listed.is_empty() {
            progress.finish(number);
        }
        *written = wrote;
        *out = listed.as_ptr();
        *count = listed.len() as u32;
        match taken {
            Taken::Free => 0,
            Taken::FromDead(_) => 2,
        }
    })
}

/// [`rc_counter_sync_begin`] without a dict (every change listed), waiting
/// up to `wait_ms`: its code and a copy of the list; the caller ends the
/// sync ([`rc_counter_sync_end`]) after code 0 or 2. For tests.
///
/// # Safety
///
/// As [`rc_counter_sync_begin`]'s.
#[doc(hidden)]
pub unsafe fn sync_listing(engine: &mut Engine, wait_ms: u32) -> (i32, Vec<Changed>) {
    let (mut out, mut count, mut written) = (std::ptr::null(), 0, 0);
    let rc = rc_counter_sync_begin(
        engine,
        wait_ms,
        std::ptr::null_mut(),
        None,
        &mut out,
        &mut count,
        &mut written,
    );
    let listed = if count == 0 {
        Vec::new()
    } else {
        std::slice::from_raw_parts(out, count as usize).to_vec()
    };
    (rc, listed)
}

/// How many counters ahead of the one it checks a sync prefetches.
const PREFETCH_AHEAD: usize = 8;

/// Sorts `values` by their bits `bits` (within 0..64), least significant
/// digit first, 11 bits a digit: a stable radix sort, with `scratch` as
/// room. A few passes over the values instead of the comparisons of a
/// sort of 10,000 record offsets (100 us).
fn radix_sort(values: &mut Vec<u64>, scratch: &mut Vec<u64>, bits: std::ops::Range<u32>) {
    const DIGIT: u32 = 11;
    let mut shift = bits.start;
    while shift < bits.end {
        let mask = (1u64 << DIGIT.min(bits.end - shift)) - 1;
        let digit = |value: u64| ((value >> shift) & mask) as usize;
        let mut starts = [0usize; 1 << DIGIT];
        for &value in values.iter() {
            starts[digit(value)] += 1;
        }
        let mut sum = 0;
        for start in starts.iter_mut() {
            let count = *start;
            *start = sum;
            sum += count;
        }
        scratch.clear();
        scratch.resize(values.len(), 0);
        for &value in values.iter() {
            let place = &mut starts[digit(value)];
            scratch[*place] = value;
            *place += 1;
        }
        std::mem::swap(values, scratch);
        shift += DIGIT;
    }
}

/// Takes `lock`, waiting up to `wait_ms` while another live process holds
/// it; `None` when it is still held then, or held by this process (a second
/// light thread of it, which cannot finish while we wait). For the locks
/// other than the mirror's (the lax journal's), which nothing else stands
/// in for.
fn take_waiting(lock: &AtomicU64, wait_ms: u32) -> Option<Taken> {
    match take_unless(lock, wait_ms, || false) {
        Wait::Taken(taken) => Some(taken),
        Wait::Done | Wait::Held => None,
    }
}

/// How [`take_unless`] ended.
enum Wait {
    Taken(Taken),
    /// What the lock was wanted for was done meanwhile.
    Done,
    /// Still held after the wait, or held by this process.
    Held,
}

/// As [`take_waiting`], but gives up the wait as soon as `done` is true
/// (checked each time the lock is found held). The first millisecond of a
/// wait yields rather than sleeps: a sleep lasts some 150 us, as long as a
/// sync of 1,000 keys.
fn take_unless(lock: &AtomicU64, wait_ms: u32, done: impl Fn() -> bool) -> Wait {
    let start = Instant::now();
    let deadline = start + Duration::from_millis(u64::from(wait_ms));
    let me = me();
    loop {
        match lock::try_lock(lock, me, alive) {
            Ok(taken) => return Wait::Taken(taken),
            Err(_) if done() => return Wait::Done,
            Err(holder) if holder == me || Instant::now() >= deadline => return Wait::Held,
            Err(_) if start.elapsed() < Duration::from_millis(1) => std::thread::yield_now(),
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

thread_local! {
    /// The last [`rc_counter_prometheus`]'s text and its room.
    static COUNTER_TEXT: RefCell<Render> = RefCell::new(Render::default());
}

/// Renders every counter key of the engine as Prometheus samples of
/// `family` (one line each, sorted by key: `src/engine/counter_text.rs`),
/// each value as a counter with a sync interval reads it; `*text` and
/// `*text_len` give the text, valid until the next call in this process.
/// With `names_len` 0 the labels are `dict` (`dict`, the dict's name) and
/// `key`; else `names` holds label names joined by commas, which take the
/// key's parts between `separator`s. Reads the records without a lock.
///
/// # Errors
///
/// The number of keys, or `CODE_BAD_ARGUMENT`, `CODE_INTERNAL`.
///
/// # Safety
///
/// `engine` is null or from [`rc_engine_attach`]; `family`, `dict`, `names`
/// and `separator` point to as many readable bytes as their lengths say
/// (or the length is 0); `text` and `text_len` are writable.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn rc_counter_prometheus(
    engine: *const Engine,
    family: *const u8,
    family_len: usize,
    dict: *const u8,
    dict_len: usize,
    names: *const u8,
    names_len: usize,
    separator: *const u8,
    separator_len: usize,
    text: *mut *const u8,
    text_len: *mut usize,
) -> i32 {
    let given = |ptr: *const u8, len: usize| !ptr.is_null() || len == 0;
    let (engine, text, text_len) = match (engine.as_ref(), text.as_mut(), text_len.as_mut()) {
        (Some(engine), Some(text), Some(text_len))
            if given(family, family_len)
                && given(dict, dict_len)
                && given(names, names_len)
                && given(separator, separator_len) =>
        {
            (engine, text, text_len)
        }
        _ => return CODE_BAD_ARGUMENT,
    };
    *text = std::ptr::null();
    *text_len = 0;
    guarded(CODE_INTERNAL, || {
        let family = key_bytes(family, family_len);
        let names: Vec<&[u8]> = key_bytes(names, names_len).split(|&b| b == b',').collect();
        let labels = if names_len == 0 {
            Labels::DictAndKey(key_bytes(dict, dict_len))
        } else {
            Labels::Split {
                names: &names,
                separator: key_bytes(separator, separator_len),
            }
        };
        COUNTER_TEXT.with(|render| {
            let mut render = render.borrow_mut();
            let count = render.counters(&engine.table, family, labels);
            *text = render.text.as_ptr();
            *text_len = render.text.len();
            i32::try_from(count).unwrap_or(i32::MAX)
        })
    })
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
    let record = Requests::with_edges_sized(cells, layout, &shape.edges_ms[..layout.edges()]);
    match record.record(window, latency_ms, &Worker) {
        Recorded::Window => IN_WINDOW,
        Recorded::TotalOnly => TOTAL_ONLY,
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

/// Removes the request keys (other than "all" and the overflow key
/// `overflow_key`) of records of this layout with no request in the last
/// `idle` seconds at `now` (windows of `window` seconds: a key's last
/// request is taken to be at the end of its newest window), at most `max`
/// of them (0: no limit), each giving back its place among `max_keys`.
/// Each is checked again under the table lock, so that a key written
/// meanwhile stays.
///
/// # Errors
///
/// The number removed, or `CODE_BAD_ARGUMENT`, `CODE_INTERNAL`.
///
/// # Safety
///
/// `engine` is null or from [`rc_engine_attach`]; `overflow_key` points to
/// `len` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn rc_requests_expire(
    engine: *mut Engine,
    ring: u32,
    histogram: i32,
    edges: *const f64,
    count: u32,
    window: u32,
    now: f64,
    idle: f64,
    overflow_key: *const u8,
    len: usize,
    max: u32,
) -> i32 {
    let layout = Layout::with_edges(ring as usize, histogram != 0, count as usize);
    let (engine, layout) = match (engine.as_mut(), layout) {
        (Some(engine), Some(layout))
            if window > 0
                && now.is_finite()
                && idle >= 0.0
                && !edges.is_null()
                && (!overflow_key.is_null() || len == 0) =>
        {
            (engine, layout)
        }
        _ => return CODE_BAD_ARGUMENT,
    };
    let edges = std::slice::from_raw_parts(edges, count as usize);
    guarded(CODE_INTERNAL, || {
        let edges_ms: Vec<f64> = edges.iter().map(|&e| edge_ms(e)).collect();
        let window = f64::from(window);
        // Windows that ended `idle` seconds ago or before.
        let idle_before = (now - idle) / window;
        let is_idle = |record: &Record<'static, AtomicU64>| {
            Requests::with_edges(record.cells(), layout, &edges_ms)
                .and_then(|cells| cells.last_window())
                .map_or(false, |last| ((last + 1) as f64) <= idle_before)
        };
        let overflow = key_bytes(overflow_key, len);
        let Engine {
            table,
            offsets,
            key,
            ..
        } = engine;
        let mut idle_keys = Vec::new();
        for record in table.records_in_arena_order(offsets) {
            let name = record.key_bytes();
            if record.width() == layout.width()
                && requests::is_request_key(name)
                && &name[1..] != b"all"
                && &name[1..] != overflow
                && is_idle(&record)
            {
                idle_keys.push(name.to_vec());
                if max != 0 && idle_keys.len() >= max as usize {
                    break;
                }
            }
        }
        let owner = table::Process { me, alive };
        let mut removed = 0;
        for mut name in idle_keys {
            key.clear();
            key.extend_from_slice(&name);
            match table.remove_if(key, &owner, |record| is_idle(record)) {
                Ok(true) => {
                    removed += 1;
                    if let Some(keys) = table.lookup(requests::KEYS_KEY) {
                        requests::unregister(&keys.cells()[0]);
                    }
                    if let Err(e) = heavy::forget_error(table, key, &owner, &mut name) {
                        return code_of(e);
                    }
                }
                Ok(false) => {}
                Err(e) => return code_of(e),
            }
        }
        removed
    })
}

/// A request for request key `key` that `max_keys` refused
/// ([`rc_requests_key`] said `CODE_KEYS_FULL`), at `now` (seconds): counted
/// in the engine's sketch of refused keys; a key whose estimate beats a
/// tracked key's count takes its place ([`heavy::admit`]: the tracked key
/// is removed and folded into the overflow key `overflow_key`, whose record
/// exists). Records as [`rc_requests_key`] (ring, histograms, `count`
/// edges `edges`, seconds).
///
/// # Errors
///
/// 1 when the key was admitted (its cells in `cells`), 0 when another
/// worker admitted it meanwhile (likewise), `CODE_KEYS_FULL` when it stays
/// out (the request goes to the overflow key), `CODE_FULL` (the table lock
/// was busy), `CODE_BAD_ARGUMENT`, `CODE_INTERNAL`.
///
/// # Safety
///
/// `engine` is null or from [`rc_engine_attach`]; `key` and `overflow_key`
/// point to `len` and `overflow_len` readable bytes; `edges` to `count`
/// doubles; `cells` is writable.
#[no_mangle]
pub unsafe extern "C" fn rc_requests_admit(
    engine: *mut Engine,
    key: *const u8,
    len: usize,
    ring: u32,
    histogram: i32,
    edges: *const f64,
    count: u32,
    max_keys: u32,
    overflow_key: *const u8,
    overflow_len: usize,
    now: f64,
    cells: *mut *const AtomicU64,
) -> i32 {
    let (engine, cells) = match key_call(engine, key, len, cells) {
        Some(both) if !edges.is_null() && (!overflow_key.is_null() || overflow_len == 0) => both,
        _ => return CODE_BAD_ARGUMENT,
    };
    let layout = match Layout::with_edges(ring as usize, histogram != 0, count as usize) {
        Some(layout) if now.is_finite() && now >= 0.0 => layout,
        _ => return CODE_BAD_ARGUMENT,
    };
    let edges = std::slice::from_raw_parts(edges, count as usize);
    guarded(CODE_INTERNAL, || {
        let edges_ms: Vec<f64> = edges.iter().map(|&e| edge_ms(e)).collect();
        engine.set_key(requests::KIND, key_bytes(key, len));
        let mut overflow = vec![requests::KIND];
        overflow.extend_from_slice(key_bytes(overflow_key, overflow_len));
        let refused = heavy::Refused {
            key: &engine.key,
            overflow: &overflow,
            layout,
            edges_ms: &edges_ms,
            max_keys: u64::from(max_keys),
            second: now as u64,
        };
        let owner = table::Process { me, alive };
        let sketch = match heavy::sketch(&engine.table) {
            Some(sketch) => sketch,
            // An engine too small for the sketch admits nothing.
            None => return CODE_KEYS_FULL,
        };
        match heavy::admit(&engine.table, &sketch, &owner, &Worker, &refused) {
            Ok(Some((record, made))) if record.width() == layout.width() => {
                *cells = record.cells().as_ptr();
                i32::from(made)
            }
            Ok(_) => CODE_KEYS_FULL,
            Err(e) => code_of(e),
        }
    })
}

/// Adds to the key info of `report` (set by
/// [`crate::ffi::rc_report_key_info`]) what the admission past `max_keys`
/// did: requests and keys refused, keys admitted and evicted (from the
/// sketch), and each admitted key's error bound (read by the report's walk
/// with the keys, or with the one key of a report of one).
///
/// # Safety
///
/// `engine` is null or from [`rc_engine_attach`]; `report` is null or
/// live.
#[no_mangle]
pub unsafe extern "C" fn rc_requests_admission(engine: *const Engine, report: *mut Report) {
    if let (Some(engine), Some(report)) = (engine.as_ref(), report.as_mut()) {
        guarded((), || {
            let figures = heavy::existing_sketch(&engine.table)
                .map_or_else(Default::default, |sketch| sketch.figures());
            report.set_admission(figures);
        });
    }
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
    let percentiles = report.percentiles();
    scratch.windows.extend((0..=report.previous()).map(|age| {
        now.checked_sub(age as u64)
            .and_then(|window| {
                if percentiles {
                    record.window_summary(window)
                } else {
                    record.window_counts(window)
                }
            })
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
            let error = heavy::error_of(&engine.table, &engine.key, &mut Vec::new());
            if error > 0 {
                report.add_admission_error(key, error);
            }
        } else {
            let address = engine as *const Engine as usize;
            let slots = engine.table.index_slots();
            // The keys registered against max_keys, "all" and the overflow
            // key: all there is to read, but for keys made meanwhile.
            report.reserve_keys(registered(engine) as usize + 2);
            let mut walk = Walk::new(address, layout, edges_ms, current, slots);
            // The mark before the scan: a record published or removed
            // after it moves the next report's mark on.
            let mark = engine.table.records_mark();
            let known = engine.report_offsets.get_mut();
            if mark.is_some() && mark == known.0 {
                walk.scanned_as(&known.1);
            } else {
                walk.mark = mark;
            }
            report.walk = Some(walk);
        }
        Box::into_raw(Box::new(report))
    })
}

/// The request record at `offset` of a walk's table, if it is one of the
/// walk's layout (for a prefetch: read nothing else of it).
fn requests_at<'a>(
    table: &Table<'a, AtomicU64>,
    walk: &'a Walk,
    offset: u32,
) -> Option<Requests<'a, AtomicU64>> {
    let record = table.record_in_arena(offset);
    if record.width() != walk.layout.width() {
        return None;
    }
    Requests::with_edges(record.cells(), walk.layout, &walk.edges_ms)
}

/// How many records ahead a walk asks for a record's cells (and twice
/// as many for its first line): far enough ahead for the lines to
/// arrive (a record is read in some 100 ns, a miss takes about as long
/// and more on a busy machine).
const PREFETCH_RECORDS: usize = 8;

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
            // For the next reports, while the records stay as they were.
            if let Some(mark) = walk.mark {
                let mut known = engine.report_offsets.borrow_mut();
                known.0 = Some(mark);
                walk.offsets_into(&mut known.1);
            }
        }
        let width = walk.layout.width();
        let percentiles = report.percentiles();
        let mut scratch = Scratch::default();
        let offsets = walk.take(max);
        let table = &engine.table;
        for (i, &offset) in offsets.iter().enumerate() {
            // Records some 4.9 KB apart are cache misses one after the
            // other: their lines are asked for ahead, the first line (for
            // the key's length) further ahead than the cells'.
            if let Some(&far) = offsets.get(i + 2 * PREFETCH_RECORDS) {
                table.prefetch_record(far);
            }
            if let Some(&near) = offsets.get(i + PREFETCH_RECORDS) {
                if let Some(cells) = requests_at(table, &walk, near) {
                    cells.prefetch();
                }
            }
            // Nearer, the lines of the buckets with counts, by the lines
            // words the prefetch above brought.
            if percentiles {
                if let Some(&nearer) = offsets.get(i + PREFETCH_RECORDS / 2) {
                    if let Some(cells) = requests_at(table, &walk, nearer) {
                        cells.prefetch_buckets();
                    }
                }
            }
            let record = engine.table.record_in_arena(offset);
            let key = record.key_bytes();
            if record.width() == 1 && key.starts_with(heavy::ERROR_PREFIX) {
                // An admitted key's error bound, for the key info.
                let error = record.cells()[0].load(Relaxed);
                report.add_admission_error(&key[heavy::ERROR_PREFIX.len()..], error);
                continue;
            }
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

// Strict counters (src/engine/strict.rs): a record's value and state in one
// 16-byte pair changed by a double-width compare-and-swap; batches and
// snapshots under the batch lock, through the journal.

/// A strict update met a record a batch holds, or a batch met the batch
/// lock held: call [`rc_strict_help`] (or wait), then again.
pub const CODE_BUSY: i32 = -40;
/// This CPU has no double-width compare-and-swap.
pub const CODE_NO_DWCAS: i32 = -41;
/// A strict update (or batch) met a record that was removed (its pair
/// [`strict::GONE`]): nothing changed; [`rc_strict_reclaim`] its key, look
/// it up again, then again.
pub const CODE_GONE: i32 = -44;

/// The kind byte of a strict record, and its width in cells.
pub const STRICT_KIND: i32 = 115;
pub const STRICT_WIDTH: i32 = 3;
const _: () = assert!(STRICT_KIND == strict::KIND as i32 && STRICT_WIDTH == strict::WIDTH as i32);

/// The batch control record's key and the journals' (by capacity's log2).
const STRICT_CONTROL_KEY: &[u8] = b"s\0batch";
const STRICT_JOURNAL_KEY: &[u8] = b"s\0journal";
/// The smallest journal, in entries.
const STRICT_MIN_JOURNAL: usize = 8;

/// The result of a strict update: the values after and before.
#[repr(C)]
pub struct StrictResult {
    pub new_value: i64,
    pub old_value: i64,
}

/// Milliseconds since the epoch, read once per call and only when needed
/// (a key that expires, an update with a ttl).
struct Clock(std::cell::Cell<u64>);

impl Clock {
    fn new() -> Clock {
        Clock(std::cell::Cell::new(0))
    }

    fn ms(&self) -> u64 {
        if self.0.get() == 0 {
            let since = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_millis() as u64);
            self.0.set(since.max(1));
        }
        self.0.get()
    }
}

/// # Safety
///
/// `cells` is null or a strict record's cells from [`rc_engine_record`].
unsafe fn strict_pair<'a>(cells: *const AtomicU64) -> Option<&'a AtomicPair> {
    if cells.is_null() {
        None
    } else {
        Some(AtomicPair::of_cells(cells))
    }
}

/// One update's decision: `op n` when `value <cmp> operand` (Redis' rules:
/// an absent key is 0), the expiry as [`strict::expiry_after`] says.
fn strict_decide(
    state: &Current,
    op: Op,
    cmp: Cmp,
    operand: i64,
    n: i64,
    ttl_ms: u64,
    now: impl Fn() -> u64,
) -> Result<(Change, Outcome), crate::error::Error> {
    let outcome = int64::apply(state.value, op, cmp, operand, n)?;
    if !outcome.applied {
        return Ok((Change::Keep, outcome));
    }
    let expiry_ms = strict::expiry_after(state, op == Op::Set, ttl_ms, now);
    Ok((
        Change::Write {
            value: outcome.new,
            expiry_ms,
        },
        outcome,
    ))
}

/// Whether strict counters work on this CPU: 0, or `CODE_NO_DWCAS` (with
/// the reason in [`rc_engine_error`]).
#[no_mangle]
pub extern "C" fn rc_strict_supported() -> i32 {
    strict_support(strict::supported())
}

/// [`rc_strict_supported`]'s answer for a CPU that has the instruction or
/// not (testable on one that has it).
fn strict_support(supported: bool) -> i32 {
    if supported {
        0
    } else {
        remember(
            "strict counters in the shared engine need a 16-byte compare-and-swap \
             (x86_64 or aarch64)",
        );
        CODE_NO_DWCAS
    }
}

/// One update of a strict key, lock-free: `op n` (0 add, 1 sub, 2 set)
/// when the value `cmp` `operand` (0 always, ...); a key made (or set) by
/// it expires after `ttl_ms` (0: never). The request path: no panic guard
/// (no indexing, no allocation, checked arithmetic).
///
/// # Errors
///
/// 1 applied, 0 the comparison failed (`new == old`), `CODE_OVERFLOW`
/// (nothing changed), `CODE_BUSY` (a batch holds the key: see
/// [`rc_strict_help`]), `CODE_GONE` (the record was removed: nothing
/// changed), `CODE_BAD_ARGUMENT`.
///
/// # Safety
///
/// `cells` is null or a strict record's cells from [`rc_engine_record`];
/// `out` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn rc_strict_update(
    cells: *const AtomicU64,
    op: i32,
    cmp: i32,
    operand: i64,
    n: i64,
    ttl_ms: i64,
    out: *mut StrictResult,
) -> i32 {
    let (pair, out, op, cmp) = match (
        strict_pair(cells),
        out.as_mut(),
        Op::from_code(op),
        Cmp::from_code(cmp),
    ) {
        (Some(pair), Some(out), Some(op), Some(cmp)) if ttl_ms >= 0 => (pair, out, op, cmp),
        _ => return CODE_BAD_ARGUMENT,
    };
    let clock = Clock::new();
    let now = || clock.ms();
    let mut outcome = None;
    let done = strict::update(pair, now, |state| {
        let (change, result) = strict_decide(state, op, cmp, operand, n, ttl_ms as u64, now)?;
        outcome = Some(result);
        Ok::<_, crate::error::Error>(change)
    });
    match (done, outcome) {
        (Ok(_), Some(outcome)) => {
            out.new_value = outcome.new;
            out.old_value = outcome.old;
            i32::from(outcome.applied)
        }
        (Err(Refused::Busy), _) => CODE_BUSY,
        (Err(Refused::Gone(_)), _) => CODE_GONE,
        (Err(Refused::Op(_)), _) => CODE_OVERFLOW,
        (Ok(_), None) => CODE_INTERNAL,
    }
}

/// A strict key's value now: 1 present (`*value` set), 0 absent,
/// `CODE_BUSY`, `CODE_BAD_ARGUMENT`.
///
/// # Safety
///
/// As [`rc_strict_update`]; `value` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn rc_strict_get(cells: *const AtomicU64, value: *mut i64) -> i32 {
    let (pair, value) = match (strict_pair(cells), value.as_mut()) {
        (Some(pair), Some(value)) => (pair, value),
        _ => return CODE_BAD_ARGUMENT,
    };
    let clock = Clock::new();
    match strict::get(pair, || clock.ms()) {
        Ok(state) => {
            *value = state.value;
            i32::from(state.live)
        }
        Err(_) => CODE_BUSY,
    }
}

/// Removes a strict key: 1 it was present (its value in `*old`), 0 it was
/// not (or its record was removed), `CODE_BUSY`, `CODE_BAD_ARGUMENT`. The
/// record stays: [`rc_strict_reclaim`] takes it out of the table.
///
/// # Safety
///
/// As [`rc_strict_get`].
#[no_mangle]
pub unsafe extern "C" fn rc_strict_del(cells: *const AtomicU64, old: *mut i64) -> i32 {
    let (pair, old) = match (strict_pair(cells), old.as_mut()) {
        (Some(pair), Some(old)) => (pair, old),
        _ => return CODE_BAD_ARGUMENT,
    };
    let clock = Clock::new();
    match strict::update(
        pair,
        || clock.ms(),
        |state| {
            Ok::<_, ()>(if state.live {
                Change::Remove
            } else {
                Change::Keep
            })
        },
    ) {
        Ok(state) => {
            *old = state.value;
            i32::from(state.live)
        }
        Err(Refused::Gone(_)) => 0,
        Err(_) => CODE_BUSY,
    }
}

/// 1 when nobody has written the strict record yet (the dict's value from
/// an older version of the library may be imported), else 0.
///
/// # Safety
///
/// As [`rc_strict_update`].
#[no_mangle]
pub unsafe extern "C" fn rc_strict_untouched(cells: *const AtomicU64) -> i32 {
    strict_pair(cells).map_or(0, |pair| i32::from(strict::untouched(pair)))
}

/// Gives an untouched strict record its first state: `value` expiring at
/// `expiry_ms` (0 never) when `present`, else absent. 1 for the call that
/// did, 0 when the record was touched (or a batch holds it).
///
/// # Safety
///
/// As [`rc_strict_update`].
#[no_mangle]
pub unsafe extern "C" fn rc_strict_import(
    cells: *const AtomicU64,
    present: i32,
    value: i64,
    expiry_ms: i64,
) -> i32 {
    strict_pair(cells).map_or(0, |pair| {
        let first = (present != 0).then_some((value, expiry_ms.max(0) as u64));
        i32::from(strict::import(pair, first))
    })
}

/// The batch lock's control record, made at the first use.
fn strict_batches<'a>(
    engine: &'a Engine,
    alive_fn: &'a dyn Fn(u32) -> bool,
) -> Result<Batches<'a, AtomicU64>, Error> {
    let (record, _) = engine
        .table
        .get_or_insert(STRICT_CONTROL_KEY, strict::CONTROL_WIDTH)?;
    Ok(Batches {
        control: record.cells(),
        me: me(),
        alive: alive_fn,
    })
}

/// What a strict update that met `CODE_BUSY` calls: when the batch that
/// holds its key died, finishes it. 1 when the caller may try again at
/// once, 0 while a live batch runs (wait a little), or a negative code.
///
/// # Safety
///
/// `engine` is null or from [`rc_engine_attach`].
#[no_mangle]
pub unsafe extern "C" fn rc_strict_help(engine: *mut Engine) -> i32 {
    let engine = match engine.as_ref() {
        Some(engine) => engine,
        None => return CODE_BAD_ARGUMENT,
    };
    guarded(CODE_INTERNAL, || match strict_batches(engine, &alive) {
        Ok(batches) => i32::from(batches.help::<AtomicPair>()),
        Err(e) => code_of(e),
    })
}

/// A batch of strict updates over `records` distinct records (`cells`),
/// all or none, in input order: update `i` is `op ns[i]` on record
/// `record_of[i]` when its value `cmps[i]` `operands[i]`, a key it makes
/// (or sets) expiring after `ttls_ms[i]` (0 never). Writes each update's
/// new and old value into `news` and `olds`. With `updates` 0, a snapshot:
/// each record's value (0 when absent) into `news`.
///
/// # Errors
///
/// 0 done; `CODE_OVERFLOW` with the failing update in `*failed` (nothing
/// changed); `CODE_GONE` with the removed record's index in `*failed`
/// (nothing changed: reclaim and look up its key, then again);
/// `CODE_BUSY` (another batch runs: wait, then again);
/// `CODE_FULL` (no room for the journal); `CODE_BAD_ARGUMENT`.
///
/// # Safety
///
/// `engine` is from [`rc_engine_attach`]; `cells` holds `records` strict
/// records' cells of that engine; `record_of`, `cmps`, `operands`, `ns`,
/// `ttls_ms`, `olds` hold `updates` elements (null when 0); `news` holds
/// `max(updates, records)`; `failed` is writable.
#[no_mangle]
pub unsafe extern "C" fn rc_strict_batch(
    engine: *mut Engine,
    records: u32,
    cells: *const *const AtomicU64,
    updates: u32,
    op: i32,
    record_of: *const u32,
    cmps: *const i32,
    operands: *const i64,
    ns: *const i64,
    ttls_ms: *const i64,
    news: *mut i64,
    olds: *mut i64,
    failed: *mut u32,
) -> i32 {
    let (engine, failed, op) = match (engine.as_ref(), failed.as_mut(), Op::from_code(op)) {
        (Some(engine), Some(failed), Some(op)) if !cells.is_null() && !news.is_null() => {
            (engine, failed, op)
        }
        _ => return CODE_BAD_ARGUMENT,
    };
    let (records, updates) = (records as usize, updates as usize);
    if updates > 0
        && (record_of.is_null()
            || cmps.is_null()
            || operands.is_null()
            || ns.is_null()
            || ttls_ms.is_null()
            || olds.is_null())
    {
        return CODE_BAD_ARGUMENT;
    }
    guarded(CODE_INTERNAL, || {
        let cells = std::slice::from_raw_parts(cells, records);
        if cells.iter().any(|c| c.is_null()) {
            return CODE_BAD_ARGUMENT;
        }
        let pairs: Vec<&AtomicPair> = cells.iter().map(|&c| AtomicPair::of_cells(c)).collect();
        let batches = match strict_batches(engine, &alive) {
            Ok(batches) => batches,
            Err(e) => return code_of(e),
        };
        let capacity = records.max(STRICT_MIN_JOURNAL).next_power_of_two();
        let mut key = STRICT_JOURNAL_KEY.to_vec();
        key.push(capacity.trailing_zeros() as u8);
        let journal = match engine
            .table
            .get_or_insert(&key, (capacity * strict::ENTRY_WORDS) as u32)
        {
            Ok((record, _)) => record.cells(),
            Err(e) => return code_of(e),
        };
        let clock = Clock::new();
        let now = || clock.ms();
        let news = std::slice::from_raw_parts_mut(news, updates.max(records));
        let (mut states, mut changes) = (Vec::new(), Vec::new());
        let ran = if updates == 0 {
            batches.run(
                &pairs,
                journal,
                now,
                |_, _| Ok::<_, usize>(()),
                &mut states,
                &mut changes,
            )
        } else {
            let record_of = std::slice::from_raw_parts(record_of, updates);
            let cmps = std::slice::from_raw_parts(cmps, updates);
            let operands = std::slice::from_raw_parts(operands, updates);
            let ns = std::slice::from_raw_parts(ns, updates);
            let ttls_ms = std::slice::from_raw_parts(ttls_ms, updates);
            let olds = std::slice::from_raw_parts_mut(olds, updates);
            if record_of.iter().any(|&r| r as usize >= records)
                || cmps.iter().any(|&c| Cmp::from_code(c).is_none())
                || ttls_ms.iter().any(|&t| t < 0)
            {
                return CODE_BAD_ARGUMENT;
            }
            batches.run(
                &pairs,
                journal,
                now,
                |states, changes| {
                    let mut working = states.to_vec();
                    for i in 0..updates {
                        let r = record_of[i] as usize;
                        let cmp = Cmp::from_code(cmps[i]).unwrap_or(Cmp::Always);
                        let (change, outcome) = strict_decide(
                            &working[r],
                            op,
                            cmp,
                            operands[i],
                            ns[i],
                            ttls_ms[i] as u64,
                            now,
                        )
                        .map_err(|_| i)?;
                        if let Change::Write { value, expiry_ms } = change {
                            working[r] = Current {
                                value,
                                live: true,
                                expiry_ms,
                            };
                            changes[r] = change;
                        }
                        news[i] = outcome.new;
                        olds[i] = outcome.old;
                    }
                    Ok(())
                },
                &mut states,
                &mut changes,
            )
        };
        match ran {
            Ok(()) => {
                if updates == 0 {
                    for (value, state) in news.iter_mut().zip(&states) {
                        *value = state.value;
                    }
                }
                0
            }
            Err(Refused::Busy) => CODE_BUSY,
            Err(Refused::Gone(r)) => {
                *failed = r as u32;
                CODE_GONE
            }
            Err(Refused::Op(i)) => {
                *failed = i as u32;
                CODE_OVERFLOW
            }
        }
    })
}

/// The next strict key at or after index slot `*cursor` whose key (after
/// the kind byte) starts with `prefix`, and present: its key (in the
/// region: valid for the worker's life) and value; `*cursor` moves past
/// it. 1 found, 0 none left, `CODE_BAD_ARGUMENT`. A record a batch holds
/// is skipped (a listing is no snapshot).
///
/// # Safety
///
/// `engine` is null or from [`rc_engine_attach`]; `prefix` points to `len`
/// bytes; the out-pointers are writable.
#[no_mangle]
pub unsafe extern "C" fn rc_strict_next(
    engine: *mut Engine,
    prefix: *const u8,
    len: usize,
    cursor: *mut u32,
    key: *mut *const u8,
    key_len: *mut usize,
    value: *mut i64,
    cells: *mut *const AtomicU64,
) -> i32 {
    let (engine, cursor, key, key_len, value, cells) = match (
        engine.as_mut(),
        cursor.as_mut(),
        key.as_mut(),
        key_len.as_mut(),
        value.as_mut(),
        cells.as_mut(),
    ) {
        (Some(e), Some(c), Some(k), Some(l), Some(v), Some(r)) if !prefix.is_null() || len == 0 => {
            (e, c, k, l, v, r)
        }
        _ => return CODE_BAD_ARGUMENT,
    };
    guarded(CODE_INTERNAL, || {
        let prefix = key_bytes(prefix, len);
        let clock = Clock::new();
        let slots = engine.table.index_slots();
        while (*cursor as usize) < slots {
            let slot = *cursor as usize;
            *cursor += 1;
            engine.offsets.clear();
            engine
                .table
                .offsets_in_slots(slot..slot + 1, &mut engine.offsets);
            let offset = match engine.offsets.first() {
                Some(&offset) => offset,
                None => continue,
            };
            let record = engine.table.record_in_arena(offset);
            let bytes = record.key_bytes();
            if bytes.first() != Some(&strict::KIND)
                || record.width() != strict::WIDTH
                || !bytes[1..].starts_with(prefix)
            {
                continue;
            }
            let pair = AtomicPair::of_cells(record.cells().as_ptr());
            if let Ok(state) = strict::get(pair, || clock.ms()) {
                if state.live {
                    *key = bytes[1..].as_ptr();
                    *key_len = bytes.len() - 1;
                    *value = state.value;
                    *cells = record.cells().as_ptr();
                    return 1;
                }
            }
        }
        0
    })
}

/// Whether `record` is a strict record whose key (after the kind byte)
/// starts with `prefix`, and `test` holds of its pair.
fn strict_record_where(
    record: &Record<'static, AtomicU64>,
    prefix: &[u8],
    test: impl FnOnce(&AtomicPair) -> bool,
) -> bool {
    let bytes = record.key_bytes();
    bytes.first() == Some(&strict::KIND)
        && record.width() == strict::WIDTH
        && bytes[1..].starts_with(prefix)
        // SAFETY: a strict record's cells: three words of the region.
        && test(unsafe { AtomicPair::of_cells(record.cells().as_ptr()) })
}

/// One step of a sweep of a strict counter's records (keys
/// `s<prefix>...`): removes those absent (deleted) or expired, and any a
/// remover killed halfway left [`strict::GONE`], among the records of
/// `slots` index slots from `*cursor` (as [`rc_limit_expire`]). Each goes
/// to GONE first, by a compare-and-swap from the pair judged, under the
/// table lock ([`strict::retire`]): an update that lands before keeps the
/// record, one after finds GONE (`CODE_GONE`) and lands nowhere. Returns
/// how many it removed; `CODE_BAD_ARGUMENT`, `CODE_INTERNAL`, or the
/// table lock's error code.
///
/// # Safety
///
/// `engine` is null or from [`rc_engine_attach`]; `prefix` is null (with
/// `len` 0) or `len` readable bytes; `cursor` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn rc_strict_expire(
    engine: *mut Engine,
    prefix: *const u8,
    len: usize,
    cursor: *mut u32,
    slots: u32,
) -> i32 {
    let (engine, cursor) = match (engine.as_mut(), cursor.as_mut()) {
        (Some(engine), Some(cursor)) if !prefix.is_null() || len == 0 => (engine, cursor),
        _ => return CODE_BAD_ARGUMENT,
    };
    guarded(CODE_INTERNAL, || {
        let prefix = key_bytes(prefix, len);
        let clock = Clock::new();
        let now = || clock.ms();
        sweep_step(
            engine,
            cursor,
            slots,
            |record| {
                strict_record_where(record, prefix, |pair| strict::reclaimable(pair.load(), now))
            },
            |record| strict_record_where(record, prefix, |pair| strict::retire(pair, now)),
        )
    })
}

/// Removes the record of the strict key `key` (after the kind byte) when
/// it is absent, expired or [`strict::GONE`] (as [`rc_strict_expire`]
/// judges, under the table lock): after a `del`, and after `CODE_GONE`
/// (a remover killed halfway may have left the record GONE in the table).
/// 1 removed, 0 not (no record, or a live or frozen one), or a negative
/// code.
///
/// # Safety
///
/// `engine` is null or from [`rc_engine_attach`]; `key` points to `len`
/// readable bytes.
#[no_mangle]
pub unsafe extern "C" fn rc_strict_reclaim(engine: *mut Engine, key: *const u8, len: usize) -> i32 {
    let engine = match engine.as_mut() {
        Some(engine) if !key.is_null() || len == 0 => engine,
        _ => return CODE_BAD_ARGUMENT,
    };
    guarded(CODE_INTERNAL, || {
        engine.set_key(strict::KIND, key_bytes(key, len));
        let clock = Clock::new();
        let now = || clock.ms();
        let owner = table::Process { me, alive };
        let retired = |record: &Record<'static, AtomicU64>| {
            strict_record_where(record, &[], |pair| strict::retire(pair, now))
        };
        match engine.table.remove_if(&engine.key, &owner, retired) {
            Ok(removed) => i32::from(removed),
            Err(e) => code_of(e),
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

// Limits (src/engine/limit.rs): a key's two windows' counts and the window
// index in one 16-byte pair, one double-width compare-and-swap an event.

/// The kind byte of a limit record, and its width in cells.
pub const LIMIT_KIND: i32 = 119;
pub const LIMIT_WIDTH: i32 = 3;
const _: () = assert!(LIMIT_KIND == limit::KIND as i32 && LIMIT_WIDTH == limit::WIDTH as i32);

/// The rule of a limit call, checked: none when an argument is out of
/// range (a limit past 32 bits, a window index past 63, a window that is
/// no positive number, an elapsed time that is no number).
fn limit_rule(index: u64, elapsed: f64, window: f64, max: u64, sliding: i32) -> Option<Rule> {
    let fits = index <= limit::MAX_INDEX
        && (1..=limit::MAX_LIMIT).contains(&max)
        && window.is_finite()
        && window > 0.0
        && !elapsed.is_nan();
    if !fits {
        return None;
    }
    Some(Rule {
        limit: max,
        window,
        sliding: sliding != 0,
    })
}

/// One event of a limit key in window `index`, `elapsed` seconds into it:
/// 1 allowed (and counted when `commit`), 0 rejected (nothing written);
/// `*used` the window's use with it (the count, or the sliding estimate).
/// `CODE_BAD_ARGUMENT` (see [`limit_rule`]; also `CODE_NO_DWCAS` is
/// checked by the caller once, with [`rc_strict_supported`]). The request
/// path: no panic guard (no indexing, no allocation).
///
/// # Safety
///
/// `cells` is null or a limit record's cells from [`rc_engine_record`];
/// `used` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn rc_limit_incoming(
    cells: *const AtomicU64,
    index: u64,
    elapsed: f64,
    window: f64,
    max: u64,
    sliding: i32,
    commit: i32,
    used: *mut f64,
) -> i32 {
    match (
        strict_pair(cells),
        used.as_mut(),
        limit_rule(index, elapsed, window, max, sliding),
    ) {
        (Some(pair), Some(used), Some(rule)) => {
            let decision = limit::incoming(pair, &rule, index, elapsed, commit != 0);
            *used = decision.used;
            i32::from(decision.allowed)
        }
        _ => CODE_BAD_ARGUMENT,
    }
}

/// Gives back one event [`rc_limit_incoming`] counted in window `index`
/// (`sliding` as it was given): 1 done, 0 the window counted none,
/// `CODE_BAD_ARGUMENT`.
///
/// # Safety
///
/// As [`rc_limit_incoming`].
#[no_mangle]
pub unsafe extern "C" fn rc_limit_uncommit(
    cells: *const AtomicU64,
    index: u64,
    sliding: i32,
) -> i32 {
    match (strict_pair(cells), limit_rule(index, 0.0, 1.0, 1, sliding)) {
        (Some(pair), Some(rule)) => i32::from(limit::uncommit(pair, &rule, index)),
        _ => CODE_BAD_ARGUMENT,
    }
}

/// The counts of a limit key as of window `index` (rolled when the record
/// holds an older one): `*prev` and `*current`; 1 the record holds a newer
/// window than `index` (counts of that one), 0, `CODE_BAD_ARGUMENT`.
///
/// # Safety
///
/// As [`rc_limit_incoming`]; `prev` and `current` are null or writable.
#[no_mangle]
pub unsafe extern "C" fn rc_limit_counts(
    cells: *const AtomicU64,
    index: u64,
    prev: *mut f64,
    current: *mut f64,
) -> i32 {
    match (strict_pair(cells), prev.as_mut(), current.as_mut()) {
        (Some(pair), Some(prev), Some(current)) if index <= limit::MAX_INDEX => {
            let counts = limit::counts(pair, index);
            *prev = counts.prev as f64;
            *current = counts.current as f64;
            i32::from(counts.index > index)
        }
        _ => CODE_BAD_ARGUMENT,
    }
}

/// Whether `record` is a limit record of the limiter whose keys start with
/// `prefix` ("<name>/") that holds nothing window `index` needs
/// ([`limit::stale`]).
fn limit_stale(record: &Record<'static, AtomicU64>, prefix: &[u8], index: u64) -> bool {
    let bytes = record.key_bytes();
    bytes.first() == Some(&limit::KIND)
        && record.width() == limit::WIDTH
        && bytes[1..].starts_with(prefix)
        // SAFETY: a limit record's cells: three words of the region.
        && limit::stale(unsafe { AtomicPair::of_cells(record.cells().as_ptr()) }, index)
}

/// One step of a sweep (the limits', the strict counters'): among the
/// records of `slots` index slots from `*cursor` (which moves on past
/// them, back to 0 at the index's end; `slots` 0: to the index's end),
/// lists those `listed` (read without the lock) says may go, then removes
/// each that `remove` (asked again under the table lock: a write since
/// the listing keeps its record) says must: how many it removed, or the
/// table lock's error code.
fn sweep_step(
    engine: &mut Engine,
    cursor: &mut u32,
    slots: u32,
    listed: impl Fn(&Record<'static, AtomicU64>) -> bool,
    remove: impl Fn(&Record<'static, AtomicU64>) -> bool,
) -> i32 {
    let end = engine.table.index_slots();
    let from = (*cursor as usize).min(end);
    let to = if slots == 0 {
        end
    } else {
        from.saturating_add(slots as usize).min(end)
    };
    *cursor = if to >= end { 0 } else { to as u32 };
    let Engine { table, offsets, .. } = engine;
    offsets.clear();
    table.offsets_in_slots(from..to, offsets);
    let keys: Vec<Vec<u8>> = offsets
        .iter()
        .map(|&offset| table.record_in_arena(offset))
        .filter(|record| listed(record))
        .map(|record| record.key_bytes().to_vec())
        .collect();
    let owner = table::Process { me, alive };
    let mut removed = 0;
    for key in &keys {
        match table.remove_if(key, &owner, |record| remove(record)) {
            Ok(true) => removed += 1,
            Ok(false) => {}
            Err(e) => return code_of(e),
        }
    }
    removed
}

/// One step of a sweep of a limiter's records (keys `w<prefix>...`):
/// removes those that hold nothing window `index` needs (written in a
/// window before `index - 1`), among the records of `slots` index slots
/// from `*cursor`, which moves on past them (back to 0 at the index's
/// end; `slots` 0: the whole index from `*cursor` to its end). Returns how
/// many it removed; `CODE_BAD_ARGUMENT`, `CODE_INTERNAL`, or the table
/// lock's error code. Each removal moves the engine's epoch; the records'
/// space comes back after the grace period (docs/engine.md).
///
/// # Safety
///
/// `engine` is null or from [`rc_engine_attach`]; `prefix` is null (with
/// `len` 0) or `len` readable bytes; `cursor` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn rc_limit_expire(
    engine: *mut Engine,
    prefix: *const u8,
    len: usize,
    index: u64,
    cursor: *mut u32,
    slots: u32,
) -> i32 {
    let (engine, cursor) = match (engine.as_mut(), cursor.as_mut()) {
        (Some(engine), Some(cursor))
            if (!prefix.is_null() || len == 0) && index <= limit::MAX_INDEX =>
        {
            (engine, cursor)
        }
        _ => return CODE_BAD_ARGUMENT,
    };
    guarded(CODE_INTERNAL, || {
        let prefix = key_bytes(prefix, len);
        let stale = |record: &Record<'static, AtomicU64>| limit_stale(record, prefix, index);
        sweep_step(engine, cursor, slots, stale, stale)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::histogram::{DEFAULT_EDGES_S, PROMETHEUS_EDGES_MS};
    use crate::stats::tests::thread_cpu;
    use std::process::Command;

    /// An engine over a region of its own, with one counter key counted.
    fn engine_with_a_count() -> Engine {
        let words: &'static [AtomicU64] = Box::leak(
            (0..4096)
                .map(|_| AtomicU64::new(0))
                .collect::<Vec<_>>()
                .into_boxed_slice(),
        );
        let table = Table::init(words, [1, 2], 0).unwrap();
        let (record, _) = table.get_or_insert(b"ck", counter::WIDTH).unwrap();
        let counter = Counter::new(record.cells());
        counter.import_base(0.0);
        counter.add(5).unwrap();
        Engine::new(table, 4096 * 8)
    }

    /// Starts a sync by hand (no dict: it lists what changed) that waits up
    /// to `wait_ms`: its code, how many it listed, how long it took.
    fn sync_by_hand(engine: &mut Engine, wait_ms: u32) -> (i32, u32, Duration) {
        let start = Instant::now();
        let (rc, listed) = unsafe { sync_listing(engine, wait_ms) };
        (rc, listed.len() as u32, start.elapsed())
    }

    /// A whole sync without a dict: what it listed (key, value, status),
    /// each plain change then marked mirrored as the Lua side does.
    fn listed(engine: &mut Engine) -> Vec<(Vec<u8>, f64, i32)> {
        let (rc, changes) = unsafe { sync_listing(engine, 0) };
        assert_eq!(rc, 0);
        let list = changes
            .iter()
            .map(|change| {
                if change.status == 0 {
                    unsafe { rc_counter_mirrored(change.cells, change.value) };
                }
                let key = unsafe { key_bytes(change.key, change.key_len as usize) };
                (key.to_vec(), change.value, change.status)
            })
            .collect();
        assert_eq!(unsafe { rc_counter_sync_end(engine) }, 1);
        list
    }

    #[test]
    fn a_sync_finds_the_keys_made_and_made_again_since_the_last_one() {
        let mut engine = engine_with_a_count();
        assert_eq!(listed(&mut engine), [(b"k".to_vec(), 5.0, 0)]);
        assert_eq!(listed(&mut engine), []);
        let count = |engine: &Engine, step| {
            let (record, _) = engine.table.get_or_insert(b"cn", counter::WIDTH).unwrap();
            Counter::new(record.cells()).add(step).unwrap();
        };
        count(&engine, 2);
        assert_eq!(listed(&mut engine), [(b"n".to_vec(), 2.0, NEEDS_BASE)]);
        Counter::new(engine.table.lookup(b"cn").unwrap().cells()).import_base(0.0);
        assert_eq!(listed(&mut engine), [(b"n".to_vec(), 2.0, 0)]);
        // Removed and made again: as many records as before, in a new one.
        assert!(engine.table.remove(b"cn").unwrap());
        count(&engine, 3);
        assert_eq!(listed(&mut engine), [(b"n".to_vec(), 3.0, NEEDS_BASE)]);
    }

    /// Another worker of this nginx (its pid: our parent's, alive).
    fn other_worker() -> Holder {
        Holder {
            pid: unsafe { libc::getppid() } as u32,
            instance: 7,
        }
    }

    /// [`engine_with_a_count`] with the mirror lock held by
    /// [`other_worker`]: the engine, the lock, the syncs' progress.
    fn engine_syncing_elsewhere() -> (Engine, &'static AtomicU64, SyncProgress<'static, AtomicU64>)
    {
        let engine = engine_with_a_count();
        let lock = engine.table.lock_word(MIRROR_LOCK);
        let progress = SyncProgress::new(engine.table.lock_word(MIRROR_PROGRESS));
        lock::try_lock(lock, other_worker(), |_| true).unwrap();
        (engine, lock, progress)
    }

    #[test]
    fn a_sync_by_hand_ends_its_wait_when_a_sync_begun_after_it_finished() {
        let (mut engine, lock, progress) = engine_syncing_elsewhere();
        // The other worker's next sync begins after ours has its ticket,
        // and finishes while still holding the lock (as a sync does, just
        // before it lets go).
        let other = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            let number = progress.begin();
            progress.finish(number);
        });
        let (rc, count, took) = sync_by_hand(&mut engine, 5_000);
        other.join().unwrap();
        assert_eq!((rc, count), (0, 0), "done by the other worker's sync");
        assert!(took < Duration::from_secs(2), "waited {:?}", took);
        assert_eq!(lock::holder(lock), Some(other_worker()), "lock not taken");
    }

    #[test]
    fn a_sync_by_hand_waits_for_the_lock_while_no_later_sync_finished() {
        let (mut engine, lock, progress) = engine_syncing_elsewhere();
        // Begun before ours: it may have passed our keys before we counted.
        let number = progress.begin();
        let other = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            progress.finish(number);
        });
        let (rc, count, took) = sync_by_hand(&mut engine, 300);
        other.join().unwrap();
        assert_eq!((rc, count), (1, 0), "still held after the wait");
        assert!(took >= Duration::from_millis(300));
        // Once let go, ours takes the lock and lists the key itself.
        assert!(lock::unlock(lock, other_worker()));
        let (rc, count, _) = sync_by_hand(&mut engine, 300);
        assert_eq!((rc, count), (0, 1));
        assert!(unsafe { rc_counter_sync_end(&mut engine) } == 1);
    }

    #[test]
    fn a_radix_sort_orders_by_the_bits_asked_and_keeps_ties_in_order() {
        let mut state = 0x1234_5678_9ABC_DEF0u64;
        let mut values: Vec<u64> = (0..10_000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state
            })
            .collect();
        let mut expected = values.clone();
        let mut scratch = Vec::new();
        radix_sort(&mut values, &mut scratch, 0..64);
        expected.sort_unstable();
        assert_eq!(values, expected);
        // By the high half only: ties keep the order they came in.
        let mut pairs: Vec<u64> = (0..5000u64).map(|i| ((i % 7) << 32) | i).collect();
        radix_sort(&mut pairs, &mut scratch, 32..64);
        let mut stable: Vec<u64> = (0..5000u64).map(|i| ((i % 7) << 32) | i).collect();
        stable.sort_by_key(|pair| pair >> 32);
        assert_eq!(pairs, stable);
        let mut none: Vec<u64> = Vec::new();
        radix_sort(&mut none, &mut scratch, 0..22);
        assert!(none.is_empty());
    }

    fn engine_on(words: usize) -> *mut Engine {
        let region: &'static [AtomicU64] =
            Box::leak((0..words).map(|_| AtomicU64::new(0)).collect());
        Box::into_raw(Box::new(Engine::new(
            Table::init(region, [1, 2], 3).unwrap(),
            words * 8,
        )))
    }

    unsafe fn cells_of(engine: *mut Engine, key: &[u8], width: u32) -> *const AtomicU64 {
        let mut cells = std::ptr::null();
        assert!(rc_engine_record(engine, b's', key.as_ptr(), key.len(), width, 1, &mut cells) >= 0);
        cells
    }

    /// What spec/resty/strict_spec.lua's `hold` leaves: a batch of a
    /// dead process that froze one record; the next update finishes it.
    #[test]
    fn a_strict_update_finishes_a_dead_batch() {
        unsafe {
            let engine = engine_on(1 << 14);
            let record = cells_of(engine, b"counter/k", 3);
            let mut out = StrictResult {
                new_value: 0,
                old_value: 0,
            };
            assert_eq!(rc_strict_update(record, 2, 0, 0, 7, 0, &mut out), 1);
            let control = cells_of(engine, b"\0batch", 4);
            let journal = cells_of(engine, b"\0journal\x03", 24);
            let pair = AtomicPair::of_cells(record) as *const AtomicPair as u64;
            let control = std::slice::from_raw_parts(control, 4);
            let journal = std::slice::from_raw_parts(journal, 24);
            control[0].store((2 << 32) | 4_194_305, Relaxed);
            journal[0].store(pair, Relaxed);
            control[2].store(1, Relaxed);
            control[3].store(journal.as_ptr() as u64, Relaxed);
            control[1].store(1, Relaxed);
            let meta = &*((pair + 8) as *const AtomicU64);
            meta.fetch_add(strict::FROZEN, Relaxed);
            assert_eq!(rc_strict_update(record, 0, 0, 0, 1, 0, &mut out), CODE_BUSY);
            assert_eq!(rc_strict_help(engine), 1);
            assert_eq!(rc_strict_update(record, 0, 0, 0, 1, 0, &mut out), 1);
            assert_eq!(out.new_value, 8);
        }
    }

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
    /// histograms: what make bench's growth scrapes. With `busy`, each
    /// key has 7 requests (1.1 ms to 0.8 s) in each of its three windows
    /// instead: histograms to read.
    fn engine_of_keys(keys: usize, busy: bool) -> Engine {
        let words: &'static [AtomicU64] = Box::leak(
            (0..keys * 1375)
                .map(|_| AtomicU64::new(0))
                .collect::<Vec<_>>()
                .into_boxed_slice(),
        );
        let mut engine = Engine::new(Table::init(words, [1, 2], 7).unwrap(), words.len() * 8);
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
                if busy {
                    for window in 26_999_998..=27_000_000 {
                        for ms in [1.1, 4.0, 12.0, 30.0, 90.0, 250.0, 800.0] {
                            let ms = ms * (1.0 + (i % 13) as f64 / 13.0);
                            assert_eq!(rc_requests_record(cells, &shape, window, ms), 0);
                        }
                    }
                } else {
                    let rc = rc_requests_record(cells, &shape, 27_000_000, 12.0);
                    assert_eq!(rc, 0);
                }
            }
        }
        engine
    }

    /// A report of every key of `engine`, walked in one step (for the
    /// Prometheus text only, without `percentiles`).
    fn walked(engine: &mut Engine, now: f64, percentiles: bool) -> Box<Report> {
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
            if !percentiles {
                assert_eq!(crate::ffi::rc_report_without_percentiles(report), 0);
            }
            assert_eq!(rc_requests_report_walk(engine, report, 0), 1);
            Box::from_raw(report)
        }
    }

    #[test]
    fn a_report_scans_the_index_again_when_a_record_was_made_or_removed() {
        let mut engine = engine_of_keys(30, false);
        let now = 27_000_000.0 * 60.0 + 1.5;
        // The keys a report shows, and whether it had the index to scan.
        let report = |engine: &mut Engine| {
            let report = unsafe {
                rc_requests_report(
                    engine,
                    3,
                    1,
                    DEFAULT_EDGES_S.as_ptr(),
                    DEFAULT_EDGES_S.len() as u32,
                    60,
                    now,
                    b"".as_ptr(),
                    0,
                    0,
                )
            };
            let mut report = unsafe {
                let scanned = (*report).walk.as_ref().unwrap().scanned();
                // In steps of 7 records: a scan of the index in steps.
                while rc_requests_report_walk(engine, report, 7) == 0 {}
                (Box::from_raw(report), !scanned)
            };
            let json: serde_json::Value =
                serde_json::from_str(report.0.json(1.0, 2.0, false)).unwrap();
            let keys = json["stats"].as_object().unwrap().len();
            (keys, report.1)
        };
        assert_eq!(report(&mut engine), (30, true));
        assert_eq!(report(&mut engine), (30, false), "the same records");
        assert_eq!(report(&mut engine), (30, false));
        // A key made since.
        let mut cells = std::ptr::null();
        let key = b"/made/since";
        unsafe {
            let made = rc_requests_key(
                &mut engine,
                key.as_ptr(),
                key.len(),
                3,
                1,
                11,
                100,
                1,
                &mut cells,
            );
            assert!(made >= 0, "{}", made);
            let mut shape = RequestsShape {
                ring: 3,
                histogram: 1,
                edges: 11,
                reserved: 0,
                edges_ms: [0.0; MAX_EDGES],
            };
            shape.edges_ms[..11].copy_from_slice(&PROMETHEUS_EDGES_MS);
            assert_eq!(rc_requests_record(cells, &shape, 27_000_000, 5.0), 0);
        }
        assert_eq!(report(&mut engine), (31, true));
        assert_eq!(report(&mut engine), (31, false));
        // A key removed since.
        let owner = table::Process { me, alive };
        engine.set_key(requests::KIND, b"/path/7");
        assert_eq!(
            engine.table.remove_if(&engine.key, &owner, |_| true),
            Ok(true)
        );
        assert_eq!(report(&mut engine), (30, true));
        assert_eq!(report(&mut engine), (30, false));
    }

    #[test]
    fn a_report_without_percentiles_renders_the_same_prometheus_text() {
        let mut engine = engine_of_keys(40, true);
        let now = 27_000_000.0 * 60.0 + 1.5;
        let mut with = walked(&mut engine, now, true);
        let mut without = walked(&mut engine, now, false);
        let text = with.prometheus("d").to_string();
        assert!(text.contains("le=\"0.01\"} 6\n"), "{}", text);
        assert_eq!(without.prometheus("d"), text);
        // It has no percentiles for the JSON: refused.
        let report = Box::into_raw(without);
        unsafe {
            assert_eq!(
                crate::ffi::rc_report_begin_json(report, 1.0, 2.0, 0),
                CODE_BAD_ARGUMENT
            );
            crate::ffi::rc_report_free(report);
        }
        assert!(with.json(1.0, 2.0, false).contains("\"p99\":"));
    }

    /// Times scrapes of 10,000 and 100,000 keys in one call, by part (the
    /// walk with the scan of the index and again without it, the JSON,
    /// the Prometheus text), best of 5: `cargo test
    /// --release --no-default-features scrape_timing -- --ignored
    /// --nocapture` (under `perf record` for a profile; SCRAPE_KEYS=n for
    /// one size only, SCRAPE_BUSY=1 for keys of 7 requests in each of
    /// three windows, SCRAPE_FORMAT=json for the walk with percentiles
    /// and the JSON only, SCRAPE_ROUNDS=n for best of n: a profile of
    /// many rounds is mostly the scrape, little the engine's making).
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
            let busy = std::env::var("SCRAPE_BUSY").is_ok();
            let mut engine = engine_of_keys(keys, busy);
            let now = 27_000_000.0 * 60.0 + 1.5;
            let mut best = [Duration::MAX; 5];
            let mut best_cpu = best;
            let mut bytes = [0; 2];
            let rounds = std::env::var("SCRAPE_ROUNDS")
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(5);
            let json_only = std::env::var("SCRAPE_FORMAT").map_or(false, |f| f == "json");
            // Wall and thread CPU time of a part, the best of the rounds.
            let mut timed = |part: usize, f: &mut dyn FnMut()| {
                let (start, start_cpu) = (Instant::now(), thread_cpu());
                f();
                best[part] = best[part].min(start.elapsed());
                best_cpu[part] = best_cpu[part].min(thread_cpu() - start_cpu);
            };
            for _ in 0..rounds {
                // With the scan of the index (the records changed since
                // the last report), then without.
                engine.report_offsets.get_mut().0 = None;
                timed(0, &mut || drop(walked(&mut engine, now, true)));
                let mut report = None;
                timed(4, &mut || report = Some(walked(&mut engine, now, true)));
                let mut report = report.unwrap();
                timed(1, &mut || bytes[0] = report.json(1.0, 2.0, false).len());
                drop(report);
                if json_only {
                    continue;
                }
                let mut report = None;
                timed(2, &mut || report = Some(walked(&mut engine, now, false)));
                let mut report = report.unwrap();
                timed(3, &mut || {
                    bytes[1] = report.prometheus("bench_stats_0_100000").len()
                });
            }
            let shown = |part: usize| match best[part] {
                Duration::MAX => "not timed".to_string(),
                wall => format!(
                    "{:.1} ms (CPU {:.1})",
                    wall.as_secs_f64() * 1e3,
                    best_cpu[part].as_secs_f64() * 1e3
                ),
            };
            eprintln!(
                "{} keys{}: walk {} (the same records again: {}), JSON {} \
                 ({} B); walk without percentiles {}, Prometheus {} ({} B)",
                keys,
                if busy { " (busy)" } else { "" },
                shown(0),
                shown(4),
                shown(1),
                bytes[0],
                shown(2),
                shown(3),
                bytes[1]
            );
        }
    }

    /// One committed event of limit key `key` (whole, kind byte first) in
    /// window `index`, its record made if needed.
    fn limit_event(engine: &Engine, key: &[u8], index: u64) {
        let rule = Rule {
            limit: 10,
            window: 1.0,
            sliding: true,
        };
        let (record, _) = engine.table.get_or_insert(key, limit::WIDTH).unwrap();
        // SAFETY: a limit record's cells.
        let pair = unsafe { AtomicPair::of_cells(record.cells().as_ptr()) };
        assert!(limit::incoming(pair, &rule, index, 0.0, true).allowed);
    }

    #[test]
    fn a_sweep_removes_a_limiters_records_of_old_windows_only() {
        let mut engine = engine_with_a_count();
        for (key, index) in [
            (&b"wa/old"[..], 5),
            (b"wa/meanwhile", 5),
            (b"wa/previous", 9),
            (b"wa/current", 10),
            (b"wb/old", 5),
        ] {
            limit_event(&engine, key, index);
        }
        engine.table.get_or_insert(b"wa/unwritten", 3).unwrap();

        let listed = std::cell::RefCell::new(Vec::new());
        let stale = |record: &Record<'static, AtomicU64>| limit_stale(record, b"a/", 10);
        let removed = sweep_step(
            &mut engine,
            &mut 0,
            0,
            |record| {
                let stale = stale(record);
                if stale {
                    listed.borrow_mut().push(record.key_bytes().to_vec());
                }
                stale
            },
            |record| {
                if record.key_bytes() == b"wa/meanwhile" {
                    // An event after the listing: asked again under the
                    // lock, kept.
                    let rule = Rule {
                        limit: 10,
                        window: 1.0,
                        sliding: true,
                    };
                    // SAFETY: a limit record's cells.
                    let pair = unsafe { AtomicPair::of_cells(record.cells().as_ptr()) };
                    assert!(limit::incoming(pair, &rule, 10, 0.0, true).allowed);
                }
                stale(record)
            },
        );
        let mut keys = listed.into_inner();
        keys.sort();
        assert_eq!(keys, [b"wa/meanwhile".to_vec(), b"wa/old".to_vec()]);
        assert_eq!(removed, 1);
        let present = |engine: &Engine, key: &[u8]| engine.table.lookup(key).is_some();
        assert!(!present(&engine, b"wa/old"));
        for key in [
            &b"wa/meanwhile"[..],
            b"wa/previous",
            b"wa/current",
            b"wb/old",
            b"wa/unwritten",
            b"ck",
        ] {
            assert!(present(&engine, key), "{:?}", key);
        }

        // In steps of 7 slots through the whole index, two windows on: all
        // of limiter "a"'s written records, none of another's.
        let epoch = engine.table.epoch();
        let (mut cursor, mut removed, mut steps) = (0u32, 0, 0);
        loop {
            let prefix = b"a/";
            // SAFETY: a live engine, a prefix of 2 bytes, a cursor.
            let n = unsafe { rc_limit_expire(&mut engine, prefix.as_ptr(), 2, 12, &mut cursor, 7) };
            assert!(n >= 0, "{}", n);
            removed += n;
            steps += 1;
            if cursor == 0 {
                break;
            }
        }
        assert_eq!(removed, 3);
        assert_eq!(steps, (engine.table.index_slots() + 6) / 7);
        assert_eq!(engine.table.epoch(), epoch + 3);
        assert!(present(&engine, b"wb/old") && present(&engine, b"wa/unwritten"));
        assert!(!present(&engine, b"wa/current"));
    }

    /// Strict counters, limits and one-node lax run where the CPU has the
    /// 16-byte compare-and-swap (x86_64, aarch64: this CPU, as the tests
    /// run on one of them); elsewhere the Lua side's `new` returns `nil`
    /// and this message.
    #[test]
    fn strict_records_are_refused_with_a_reason_where_no_pair_swaps() {
        assert_eq!(rc_strict_supported(), 0);
        assert_eq!(strict_support(true), 0);
        assert_eq!(strict_support(false), CODE_NO_DWCAS);
        let mut len = 0;
        let text = unsafe { rc_engine_error(&mut len) };
        let text = unsafe { std::slice::from_raw_parts(text, len) };
        assert_eq!(
            std::str::from_utf8(text).unwrap(),
            "strict counters in the shared engine need a 16-byte \
             compare-and-swap (x86_64 or aarch64)"
        );
    }
}
