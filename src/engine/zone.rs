//! The engine's region inside a `lua_shared_dict` zone: found again by any
//! worker, made by the first, with nginx's own slab allocator.
//!
//! This is the one file that knows nginx's memory layout: `ngx_shm_zone_t`
//! (to read the zone's address and size) and `ngx_slab_pool_t` /
//! `ngx_slab_page_t` (to walk the pool's pages), as they are on 64-bit
//! Linux in every nginx since 1.11 (Debian 12's 1.22.1 and OpenResty's
//! 1.29.2 checked). [`Pool::new`] checks that layout against facts nginx
//! itself establishes and refuses the zone when one does not hold, so a
//! different layout gives an error, never a misread.
//!
//! docs/engine.md, "Finding the region again", says why the region is
//! found by walking the pages rather than through a pointer kept somewhere.

use std::os::raw::c_void;
use std::sync::atomic::AtomicU64;

use super::table::{Table, MIN_WORDS};
use super::word::words_at;
use super::Error;

/// Offsets in `ngx_shm_zone_t`: `void *data; ngx_shm_t shm { addr, size }`.
const ZONE_SHM_ADDR: usize = 8;
const ZONE_SHM_SIZE: usize = 16;

/// Offsets in `ngx_slab_pool_t` (64-bit, POSIX semaphores).
const POOL_LOCK: usize = 0;
const POOL_WAIT: usize = 8;
const POOL_PAGES: usize = 32;
const POOL_LAST: usize = 40;
const POOL_STATS: usize = 72;
const POOL_START: usize = 88;
const POOL_END: usize = 96;
const POOL_MUTEX: usize = 104;
const POOL_ADDR: usize = 192;
const POOL_SIZE: usize = 200;
/// `ngx_slab_stat_t`: four `ngx_uint_t`.
const SLAB_STAT: usize = 32;

/// `ngx_slab_page_t`: `uintptr_t slab; ngx_slab_page_t *next; uintptr_t
/// prev;`. A page run handed out whole has the type bits of `prev` at 0
/// (NGX_SLAB_PAGE) and NGX_SLAB_PAGE_START set in `slab` on its first page,
/// the run's length in pages below it.
const PAGE_ENTRY: usize = 24;
const PAGE_SLAB: usize = 0;
const PAGE_PREV: usize = 16;
const PAGE_TYPE_MASK: u64 = 3;
const PAGE_START: u64 = 1 << 63;
/// NGX_SLAB_PAGE_BUSY: a page inside a run, not its first.
const PAGE_BUSY: u64 = u64::MAX;

/// nginx's functions the attach calls (from the nginx binary in a worker,
/// from a fake in tests).
#[derive(Clone, Copy)]
pub struct SlabApi {
    /// `ngx_shmtx_lock(ngx_shmtx_t *)`.
    pub lock: unsafe extern "C" fn(*mut c_void),
    /// `ngx_shmtx_unlock(ngx_shmtx_t *)`.
    pub unlock: unsafe extern "C" fn(*mut c_void),
    /// `ngx_slab_alloc_locked(ngx_slab_pool_t *, size_t)`.
    pub alloc_locked: unsafe extern "C" fn(*mut c_void, usize) -> *mut c_void,
    /// `ngx_pagesize`.
    pub page_size: usize,
}

/// The engine's region, as found or made.
#[derive(Debug)]
pub struct Region {
    pub table: Table<'static, AtomicU64>,
    pub bytes: usize,
    /// Whether this call made it (the first worker of a fresh zone).
    pub created: bool,
}

unsafe fn read_word(at: *const u8) -> u64 {
    (at as *const u64).read_volatile()
}

/// A slab pool whose layout was checked.
struct Pool {
    base: *mut u8,
    /// The zone's size in bytes.
    size: usize,
    pages: *const u8,
    page_count: usize,
    start: *mut u8,
    page_size: usize,
}

impl Pool {
    /// # Safety
    ///
    /// `zone` must be a live `ngx_shm_zone_t *` of a shared dict.
    unsafe fn new(zone: *const u8, page_size: usize) -> Result<Pool, Error> {
        if zone.is_null() {
            return Err(Error::ZoneLayout("no zone"));
        }
        let base = read_word(zone.add(ZONE_SHM_ADDR)) as usize as *mut u8;
        let size = read_word(zone.add(ZONE_SHM_SIZE)) as usize;
        if base.is_null() || size < POOL_SIZE || !page_size.is_power_of_two() {
            return Err(Error::ZoneLayout("the zone has no pool"));
        }
        let at = |offset: usize| read_word(base.add(offset)) as usize;
        let addr = base as usize;
        // ngx_init_zone_pool: `addr` is the pool itself, its end the
        // zone's end, and the mutex points into the pool's own lock words.
        if at(POOL_ADDR) != addr
            || at(POOL_END) != addr + size
            || at(POOL_MUTEX) != addr + POOL_LOCK
            || at(POOL_MUTEX + 8) != addr + POOL_WAIT
        {
            return Err(Error::ZoneLayout(
                "not an ngx_slab_pool_t as this library knows it",
            ));
        }
        // ngx_slab_init: after the pool come n size-class list heads, n
        // stats, the page table and the pages, page-aligned (n is the
        // page's shift less the smallest size's, 9 for 4 KiB pages).
        let (stats, pages, last, start) = (
            at(POOL_STATS),
            at(POOL_PAGES),
            at(POOL_LAST),
            at(POOL_START),
        );
        let slots = stats.wrapping_sub(addr + POOL_SIZE);
        let classes = slots / PAGE_ENTRY;
        if stats < addr + POOL_SIZE
            || slots % PAGE_ENTRY != 0
            || !(1..=16).contains(&classes)
            || pages != stats + classes * SLAB_STAT
            || last <= pages
            || (last - pages) % PAGE_ENTRY != 0
            || start % page_size != 0
            || start < last
        {
            return Err(Error::ZoneLayout(
                "the slab page table is not where nginx puts it",
            ));
        }
        let page_count = (last - pages) / PAGE_ENTRY;
        if start + page_count * page_size > addr + size {
            return Err(Error::ZoneLayout("the slab pages overrun the zone"));
        }
        Ok(Pool {
            base,
            size,
            pages: pages as *const u8,
            page_count,
            start: start as *mut u8,
            page_size,
        })
    }

    fn mutex(&self) -> *mut c_void {
        // In bounds: checked in new().
        unsafe { self.base.add(POOL_MUTEX) as *mut c_void }
    }

    /// The table in a page run starting at page `index`, if it holds one.
    ///
    /// # Safety
    ///
    /// The pool's mutex must be held.
    unsafe fn table_at(&self, index: usize) -> Option<Region> {
        let entry = self.pages.add(index * PAGE_ENTRY);
        let slab = read_word(entry.add(PAGE_SLAB));
        let prev = read_word(entry.add(PAGE_PREV));
        if prev & PAGE_TYPE_MASK != 0 || slab & PAGE_START == 0 || slab == PAGE_BUSY {
            return None;
        }
        let run = (slab & !PAGE_START) as usize;
        if run == 0 || index + run > self.page_count {
            return None;
        }
        let bytes = run * self.page_size;
        let at = self.start.add(index * self.page_size);
        let words = words_at(at, bytes / 8);
        if !Table::has_magic(words) {
            return None;
        }
        let tag = at as usize - self.base as usize;
        Table::attach(words, tag as u64).ok().map(|table| Region {
            table,
            bytes,
            created: false,
        })
    }

    /// # Safety
    ///
    /// The pool's mutex must be held.
    unsafe fn find(&self) -> Option<Region> {
        let mut index = 0;
        while index < self.page_count {
            if let Some(region) = self.table_at(index) {
                return Some(region);
            }
            index += 1;
        }
        None
    }
}

/// Finds the engine's region in a shared dict's zone, or makes one of
/// `share` of the zone's size (fewer bytes when the pool has not that much
/// room in one piece, down to one page). `seed` keys a new table's hash.
///
/// # Errors
///
/// `ZoneLayout` when the zone is not laid out as this library knows;
/// `NoRoom` when not even the smallest region fits.
///
/// # Safety
///
/// `zone` must be a live `ngx_shm_zone_t *` of a shared dict (what
/// `ngx_http_lua_ffi_shdict_udata_to_zone` returns), and `api` must be
/// nginx's own functions (or, in tests, ones that honour the same
/// contract on the same pool).
pub unsafe fn find_or_create(
    zone: *const u8,
    api: &SlabApi,
    share: f64,
    seed: [u64; 2],
) -> Result<Region, Error> {
    let pool = Pool::new(zone, api.page_size)?;
    let want_bytes = (pool.size as f64 * share) as usize;
    find_or_create_in(&pool, api, want_bytes, seed)
}

/// # Safety
///
/// As [`find_or_create`].
unsafe fn find_or_create_in(
    pool: &Pool,
    api: &SlabApi,
    want_bytes: usize,
    seed: [u64; 2],
) -> Result<Region, Error> {
    (api.lock)(pool.mutex());
    let result = match pool.find() {
        Some(region) => Ok(region),
        None => create(pool, api, want_bytes, seed),
    };
    (api.unlock)(pool.mutex());
    result
}

/// # Safety
///
/// As [`find_or_create`], with the pool's mutex held.
unsafe fn create(
    pool: &Pool,
    api: &SlabApi,
    want_bytes: usize,
    seed: [u64; 2],
) -> Result<Region, Error> {
    let page = pool.page_size;
    // The smallest region: one page (a 4 KiB one holds 24 counter keys).
    let min = (MIN_WORDS * 8).max(page);
    let mut bytes = (want_bytes / page * page).max(min);
    loop {
        let at = (api.alloc_locked)(pool.base as *mut c_void, bytes) as *mut u8;
        if !at.is_null() {
            if (at as usize) % page != 0 {
                return Err(Error::ZoneLayout(
                    "a whole-page allocation is not page-aligned",
                ));
            }
            let tag = at as usize - pool.base as usize;
            let table = Table::init(words_at(at, bytes / 8), seed, tag as u64)?;
            return Ok(Region {
                table,
                bytes,
                created: true,
            });
        }
        if bytes <= min {
            return Err(Error::NoRoom);
        }
        bytes = (bytes / 2 / page * page).max(min);
    }
}

#[cfg(test)]
mod tests {
    //! A pool laid out as ngx_slab_init lays it, with a page allocator
    //! that marks page runs as ngx_slab_alloc_pages does.
    use super::*;
    use std::cell::Cell;

    const PAGE: usize = 4096;

    thread_local! {
        static LOCKED: Cell<u32> = const { Cell::new(0) };
    }

    unsafe extern "C" fn lock(_: *mut c_void) {
        LOCKED.with(|l| l.set(l.get() + 1));
    }

    unsafe extern "C" fn unlock(_: *mut c_void) {
        LOCKED.with(|l| l.set(l.get() - 1));
    }

    /// First fit over the page table; marks runs with PAGE_START.
    unsafe extern "C" fn alloc_locked(pool: *mut c_void, size: usize) -> *mut c_void {
        assert_eq!(LOCKED.with(|l| l.get()), 1, "alloc without the mutex");
        let base = pool as *mut u8;
        let pages = read_word(base.add(POOL_PAGES)) as usize as *mut u64;
        let count = (read_word(base.add(POOL_LAST)) as usize - pages as usize) / PAGE_ENTRY;
        let start = read_word(base.add(POOL_START)) as usize;
        let want = (size + PAGE - 1) / PAGE;
        let mut i = 0;
        while i + want <= count {
            let free = (i..i + want).all(|j| *pages.add(j * 3) == 0);
            if free {
                *pages.add(i * 3) = want as u64 | PAGE_START;
                for j in i + 1..i + want {
                    *pages.add(j * 3) = PAGE_BUSY;
                }
                return (start + i * PAGE) as *mut c_void;
            }
            i += 1;
        }
        std::ptr::null_mut()
    }

    /// find_or_create with a size in bytes rather than a share.
    unsafe fn attach(zone: *const u8, want_bytes: usize, seed: [u64; 2]) -> Result<Region, Error> {
        let pool = Pool::new(zone, PAGE)?;
        find_or_create_in(&pool, &API, want_bytes, seed)
    }

    const API: SlabApi = SlabApi {
        lock,
        unlock,
        alloc_locked,
        page_size: PAGE,
    };

    /// A zone of `pages` pages: returns the memory and the ngx_shm_zone_t.
    fn fake_zone(pages: usize) -> (Vec<u64>, Vec<u64>) {
        let table_bytes = pages * PAGE_ENTRY;
        let classes = 9;
        let heads = classes * (PAGE_ENTRY + SLAB_STAT);
        let size = POOL_SIZE + heads + table_bytes + PAGE + pages * PAGE;
        let mut memory = vec![0u64; size / 8 + 1];
        let base = memory.as_mut_ptr() as *mut u8;
        let addr = base as usize;
        let stats = addr + POOL_SIZE + classes * PAGE_ENTRY;
        let page_table = stats + classes * SLAB_STAT;
        let last = page_table + table_bytes;
        let start = (last + PAGE - 1) / PAGE * PAGE;
        let set = |offset: usize, value: usize| unsafe {
            (base.add(offset) as *mut u64).write(value as u64);
        };
        set(POOL_ADDR, addr);
        set(POOL_END, addr + size);
        set(POOL_MUTEX, addr + POOL_LOCK);
        set(POOL_MUTEX + 8, addr + POOL_WAIT);
        set(POOL_STATS, stats);
        set(POOL_PAGES, page_table);
        set(POOL_LAST, last);
        set(POOL_START, start);
        let zone = vec![0, addr as u64, size as u64, 0, 0, 0, 0, 0];
        (memory, zone)
    }

    #[test]
    fn the_first_attach_makes_the_region_and_the_next_finds_it() -> Result<(), Error> {
        let (_memory, zone) = fake_zone(64);
        let zone = zone.as_ptr() as *const u8;
        let first = unsafe { attach(zone, 100_000, [1, 2]) }?;
        assert!(first.created);
        assert_eq!(first.bytes, 98_304); // 24 whole pages
        first.table.get_or_insert(b"k", 2)?;

        // Another allocation after it: the walk skips what is not ours.
        unsafe {
            lock(std::ptr::null_mut());
            let pool = Pool::new(zone, PAGE)?;
            let other = alloc_locked(pool.base as *mut c_void, 3 * PAGE) as *mut u64;
            // Bytes that look like a header in the middle of another run.
            *other.add(PAGE / 8) = super::super::table::MAGIC[0];
            unlock(std::ptr::null_mut());
        }

        let again = unsafe { attach(zone, 1 << 20, [3, 4]) }?;
        assert!(!again.created);
        assert_eq!(again.bytes, first.bytes);
        assert!(again.table.lookup(b"k").is_some());
        assert_eq!(LOCKED.with(|l| l.get()), 0);
        Ok(())
    }

    #[test]
    fn the_region_takes_its_share_of_the_zone() -> Result<(), Error> {
        let (_memory, zone) = fake_zone(64);
        let size = zone[2] as usize;
        let zone = zone.as_ptr() as *const u8;
        let region = unsafe { find_or_create(zone, &API, 0.25, [1, 2]) }?;
        assert!(region.created);
        assert_eq!(region.bytes, size / 4 / PAGE * PAGE);
        Ok(())
    }

    #[test]
    fn a_full_pool_gives_a_smaller_region_or_none() -> Result<(), Error> {
        let (_memory, zone) = fake_zone(20);
        let zone = zone.as_ptr() as *const u8;
        let region = unsafe { attach(zone, 1 << 30, [1, 2]) }?;
        assert_eq!(region.bytes, 16 * PAGE, "halved until it fits");

        let (_memory, zone) = fake_zone(1);
        let zone = zone.as_ptr() as *const u8;
        let first = unsafe { attach(zone, 1 << 20, [1, 2]) }?;
        assert_eq!(first.bytes, PAGE, "down to one page");
        assert!(!unsafe { attach(zone, 1 << 20, [1, 2]) }?.created);
        // One page, taken by another allocation: none left for us.
        let (_memory, zone) = fake_zone(1);
        let zone_ptr = zone.as_ptr() as *const u8;
        unsafe {
            lock(std::ptr::null_mut());
            let pool = Pool::new(zone_ptr, PAGE)?;
            alloc_locked(pool.base as *mut c_void, PAGE);
            unlock(std::ptr::null_mut());
        }
        let err = unsafe { attach(zone_ptr, 1 << 20, [1, 2]) }.unwrap_err();
        assert_eq!(err, Error::NoRoom);
        assert_eq!(LOCKED.with(|l| l.get()), 0);
        Ok(())
    }

    #[test]
    fn an_unknown_layout_is_refused() {
        let (mut memory, zone) = fake_zone(32);
        let zone_ptr = zone.as_ptr() as *const u8;
        // The mutex no longer points at the pool's lock word.
        memory[POOL_MUTEX / 8] += 8;
        let err = unsafe { attach(zone_ptr, 1 << 16, [1, 2]) }.unwrap_err();
        assert!(matches!(err, Error::ZoneLayout(_)), "{:?}", err);
        memory[POOL_MUTEX / 8] -= 8;
        memory[POOL_STATS / 8] += 8;
        let err = unsafe { attach(zone_ptr, 1 << 16, [1, 2]) }.unwrap_err();
        assert!(matches!(err, Error::ZoneLayout(_)), "{:?}", err);
        assert!(unsafe { attach(std::ptr::null(), 1, [0, 0]) }.is_err());
    }
}
