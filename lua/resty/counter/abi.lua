-- Copyright (C) lua-resty-counter-rs authors. Apache License 2.0.
--
-- The C ABI of resty_counter_core as LuaJIT sees it: the one place with
-- `ffi.cdef` and `ffi.load`, the ABI version checks, and every code the
-- library returns or takes, by its name in src/. Every other module takes
-- `C` and the codes from here.
--
-- The declarations mirror the `#[no_mangle] extern "C"` functions and
-- `#[repr(C)]` structs of src/ffi.rs, src/ffi_int.rs and src/ffi_engine.rs,
-- and `tests/lua_abi.rs` (`make unit-test`) fails when they drift apart: a
-- function, a parameter or return type, a struct field or a code that
-- differs, is missing on one side or is declared in another Lua file.
-- Change both sides together, and bump the ABI version of the Rust file
-- there and here: a library from another build is refused at load.


local ffi = require "ffi"
local core = require "resty_counter_core"


local error = error
local pairs = pairs
local pcall = pcall
local tostring = tostring
local ffi_string = ffi.string
local advise_huge_strings = core.advise_huge_strings
local ADVISED_BYTES = core.advised_string_bytes


-- The versions of the declarations below, by the Rust file that exports
-- them (its ABI_VERSION or ENGINE_ABI_VERSION).
local FFI_ABI = 3
local INT_ABI = 1
local ENGINE_ABI = 6


ffi.cdef[[
/* src/ffi.rs: the pending store, UTF-8 check and reports. */
typedef struct rc_store_s rc_store_t;
typedef struct rc_report_s rc_report_t;

typedef struct {
    int64_t integer;
    double  fractional;
} rc_slot_t;

typedef struct {
    uint32_t slot;
    int32_t  status;
    int64_t  integer;
    double   fractional;
    double   value;
} rc_delta_t;

rc_store_t *rc_store_new(void);
void rc_store_free(rc_store_t *store);
int32_t rc_store_alloc(rc_store_t *store, rc_slot_t **slots);
int32_t rc_store_add(rc_store_t *store, uint32_t slot, int64_t integer,
    double fractional);
const rc_delta_t *rc_store_drain(rc_store_t *store, uint32_t *count);
uint32_t rc_store_pending_keys(const rc_store_t *store);

int32_t rc_utf8_valid(const unsigned char *ptr, size_t len);

void rc_report_free(rc_report_t *report);
int32_t rc_report_without_percentiles(rc_report_t *report);
void rc_report_key_info(rc_report_t *report, uint32_t tracked,
    uint32_t max_keys, const unsigned char *overflow_key, size_t len);
void rc_report_engine_memory(rc_report_t *report, uint64_t used_bytes,
    uint64_t bytes);
int32_t rc_report_begin_json(rc_report_t *report, double free_space,
    double capacity, int32_t single);
int32_t rc_report_begin_prometheus(rc_report_t *report,
    const unsigned char *dict, size_t dict_len);
int32_t rc_report_render(rc_report_t *report, uint32_t max_keys);
int32_t rc_report_render_upto(rc_report_t *report, uint32_t max_keys,
    size_t max_bytes, uint32_t *rendered);
const unsigned char *rc_report_text(const rc_report_t *report,
    size_t *out_len);
void rc_report_clear_text(rc_report_t *report);

/* src/ffi_int.rs: exact int64 values and the sliding window. */
typedef struct {
    int64_t new_value;
    int64_t old_value;
    int32_t len;
    char    text[20];
} rc_int_result_t;

int32_t rc_int_apply(const char *current, size_t len, int32_t op,
    int32_t cmp, int64_t operand, int64_t n, rc_int_result_t *out);
int32_t rc_int_apply_i64(int64_t current, int32_t op, int32_t cmp,
    int64_t operand, int64_t n, rc_int_result_t *out);
int32_t rc_int_parse(const char *text, size_t len, int64_t *out);
int32_t rc_int_format(int64_t value, char *out);
double rc_sliding_estimate(double prev, double current, double elapsed,
    double window);
double rc_sliding_wait(double prev, double current, double elapsed,
    double window, double limit);

/* src/ffi_engine.rs: the shared engine, its counters and requests. */
typedef struct rc_engine_s rc_engine_t;

typedef struct {
    const uint64_t      *cells;
    const unsigned char *key;
    uint32_t             key_len;
    int32_t              status;
    double               value;
} rc_changed_t;

typedef struct {
    uint64_t bytes;
    uint64_t records;
    uint64_t max_records;
    uint64_t refused;
    uint64_t arena_used;
    uint64_t arena_total;
    uint64_t removed;
    uint64_t reused;
    uint64_t free;
    uint64_t free_bytes;
    uint64_t leaked_bytes;
} rc_engine_stats_t;

int32_t rc_engine_abi(void);
const unsigned char *rc_engine_error(size_t *len);
int32_t rc_engine_attach(const void *zone, double share, rc_engine_t **engine,
    uint64_t *bytes);
int32_t rc_engine_record(rc_engine_t *engine, uint8_t kind,
    const unsigned char *key, size_t len, uint32_t width, int32_t create,
    const uint64_t **cells);
int32_t rc_engine_stats(const rc_engine_t *engine, rc_engine_stats_t *out);
const uint32_t *rc_engine_epoch(const rc_engine_t *engine);

int32_t rc_counter_add(const uint64_t *cells, int64_t step);
int32_t rc_counter_add_fractional(const uint64_t *cells, double step);
double rc_counter_value(const uint64_t *cells);
int32_t rc_counter_import_base(const uint64_t *cells, double base);
typedef int (*rc_shdict_store_t)(void *zone, int op, const unsigned char *key,
    size_t key_len, int value_type, const unsigned char *str_value_buf,
    size_t str_value_len, double num_value, long exptime, int user_flags,
    char **errmsg, int *forcible);
int32_t rc_counter_sync_begin(rc_engine_t *engine, uint32_t wait_ms,
    void *zone, rc_shdict_store_t store, const rc_changed_t **out,
    uint32_t *count, uint32_t *written);
void rc_counter_mirrored(const uint64_t *cells, double value);
int32_t rc_counter_sync_end(rc_engine_t *engine);
int32_t rc_counter_prometheus(const rc_engine_t *engine,
    const unsigned char *family, size_t family_len,
    const unsigned char *dict, size_t dict_len,
    const unsigned char *names, size_t names_len,
    const unsigned char *separator, size_t separator_len,
    const unsigned char **text, size_t *text_len);

int32_t rc_requests_layout(const rc_engine_t *engine, uint32_t ring,
    uint32_t edges);
int32_t rc_requests_edges(const rc_engine_t *engine, const double *edges,
    uint32_t count);
int32_t rc_requests_key(rc_engine_t *engine, const unsigned char *key,
    size_t len, uint32_t ring, int32_t histogram, uint32_t edges,
    uint32_t max_keys, int32_t capped, const uint64_t **cells);
typedef struct {
    uint32_t ring;
    int32_t  histogram;
    uint32_t edges;
    uint32_t reserved;
    double   edges_ms[32];
} rc_requests_shape_t;
int32_t rc_requests_record(const uint64_t *cells,
    const rc_requests_shape_t *shape, uint64_t window, double latency_ms);
uint64_t rc_requests_tracked(const rc_engine_t *engine);
int32_t rc_requests_expire(rc_engine_t *engine, uint32_t ring,
    int32_t histogram, const double *edges, uint32_t count, uint32_t window,
    double now, double idle,
    const unsigned char *overflow_key, size_t len, uint32_t max);
rc_report_t *rc_requests_report(rc_engine_t *engine, uint32_t ring,
    int32_t histogram, const double *edges, uint32_t count, uint32_t window,
    double now, const unsigned char *key, size_t len, int32_t single);
int32_t rc_requests_report_walk(const rc_engine_t *engine,
    rc_report_t *report, uint32_t max_records);
int32_t rc_requests_admit(rc_engine_t *engine, const unsigned char *key,
    size_t len, uint32_t ring, int32_t histogram, const double *edges,
    uint32_t count, uint32_t max_keys, const unsigned char *overflow_key,
    size_t overflow_len, double now, const uint64_t **cells);
void rc_requests_admission(const rc_engine_t *engine, rc_report_t *report);

typedef struct {
    int64_t new_value;
    int64_t old_value;
} rc_strict_result_t;

int32_t rc_strict_supported(void);
int32_t rc_strict_update(const uint64_t *cells, int32_t op, int32_t cmp,
    int64_t operand, int64_t n, int64_t ttl_ms, rc_strict_result_t *out);
int32_t rc_strict_get(const uint64_t *cells, int64_t *value);
int32_t rc_strict_del(const uint64_t *cells, int64_t *old);
int32_t rc_strict_untouched(const uint64_t *cells);
int32_t rc_strict_import(const uint64_t *cells, int32_t present,
    int64_t value, int64_t expiry_ms);
int32_t rc_strict_help(rc_engine_t *engine);
int32_t rc_strict_batch(rc_engine_t *engine, uint32_t records,
    const uint64_t * const *cells, uint32_t updates, int32_t op,
    const uint32_t *record_of, const int32_t *cmps, const int64_t *operands,
    const int64_t *ns, const int64_t *ttls_ms, int64_t *news, int64_t *olds,
    uint32_t *failed);
int32_t rc_strict_next(rc_engine_t *engine, const unsigned char *prefix,
    size_t len, uint32_t *cursor, const unsigned char **key, size_t *key_len,
    int64_t *value, const uint64_t **cells);
int32_t rc_strict_expire(rc_engine_t *engine, const unsigned char *prefix,
    size_t len, uint32_t *cursor, uint32_t slots);
int32_t rc_strict_reclaim(rc_engine_t *engine, const unsigned char *key,
    size_t len);

typedef struct {
    uint64_t nonce;
    uint64_t seq;
    uint32_t count;
    uint32_t more;
    uint32_t next;
} rc_lax_batch_t;

typedef struct {
    const uint64_t      *cells;
    const unsigned char *key;
    uint32_t             key_len;
    int64_t              delta;
    uint64_t             ttl_ms;
} rc_lax_entry_t;

uint32_t rc_lax_width(int32_t journal);
int32_t rc_lax_add(const uint64_t *cells, int64_t step, int64_t *unsent);
int64_t rc_lax_unsent(const uint64_t *cells);
void rc_lax_request_ttl(const uint64_t *cells, uint64_t ms);
int32_t rc_lax_seen(const uint64_t *cells, int64_t *value);
void rc_lax_set_seen(const uint64_t *cells, int64_t value);
int32_t rc_lax_flush_begin(rc_engine_t *engine, const uint64_t *journal,
    const unsigned char *name, size_t len, uint32_t from,
    rc_lax_batch_t *out);
int32_t rc_lax_flush_entry(const rc_engine_t *engine,
    const uint64_t *journal, uint32_t i, uint32_t prefix_len,
    rc_lax_entry_t *out);
int32_t rc_lax_flush_end(const rc_engine_t *engine, const uint64_t *journal,
    int32_t outcome);
int32_t rc_lax_forget(rc_engine_t *engine, const uint64_t *journal,
    const uint64_t *cells, const unsigned char *name, size_t len);
uint32_t rc_lax_unsent_keys(rc_engine_t *engine, const unsigned char *name,
    size_t len);

int32_t rc_limit_incoming(const uint64_t *cells, uint64_t index,
    double elapsed, double window, uint64_t max, int32_t sliding,
    int32_t commit, double *used);
int32_t rc_limit_uncommit(const uint64_t *cells, uint64_t index,
    int32_t sliding);
int32_t rc_limit_counts(const uint64_t *cells, uint64_t index, double *prev,
    double *current);
int32_t rc_limit_expire(rc_engine_t *engine, const unsigned char *prefix,
    size_t len, uint64_t index, uint32_t *cursor, uint32_t slots);
]]


local function refuse(what, has, expects)
    error("resty_counter_core has " .. what .. " ABI " .. tostring(has)
          .. ", resty.counter.abi expects " .. expects
          .. ": the Lua files and the library come from different builds")
end


if core.ffi_abi ~= FFI_ABI then
    refuse("FFI", core.ffi_abi, FFI_ABI)
end
if core.int_abi ~= INT_ABI then
    refuse("int", core.int_abi, INT_ABI)
end
if not advise_huge_strings then
    error("resty_counter_core has no advise_huge_strings: the Lua files and"
          .. " the library come from different builds")
end


-- `require` above loaded the library; loading the same path again through
-- the FFI gives the same instance, so both halves share its statics.
local lib_path = package.searchpath("resty_counter_core", package.cpath)
if not lib_path then
    error("resty_counter_core was loaded but is not on package.cpath")
end
local C = ffi.load(lib_path)


if C.rc_engine_abi() ~= ENGINE_ABI then
    refuse("engine", C.rc_engine_abi(), ENGINE_ABI)
end


-- Every code the library returns or takes, named as in src/ (Rust's
-- CamelCase as SCREAMING_CASE, `CODE_` dropped).
local codes = {
    -- Error::code (src/error.rs): what the core refuses.
    TOO_MANY_KEYS = -1,
    OUT_OF_EXACT_RANGE = -2,
    BAD_SLOT = -3,
    INTERNAL = -4,
    CORRUPT_RECORD = -5,
    OVERFLOW = -6,
    NOT_INTEGER = -7,
    BAD_ARGUMENT = -8,
    -- CODE_* (src/ffi_engine.rs): what the shared engine refuses.
    FULL = -20,
    KEY_TOO_LONG = -21,
    BAD_WIDTH = -22,
    WIDTH_MISMATCH = -23,
    NOT_FOUND = -24,
    NO_ENGINE = -25,
    KEYS_FULL = -26,
    EDGES_MISMATCH = -27,
    -- A strict update met a key a batch holds (or a batch met another):
    -- rc_strict_help, then again; no 16-byte compare-and-swap here.
    BUSY = -40,
    NO_DWCAS = -41,
    -- A strict update or batch met a removed record: nothing changed;
    -- rc_strict_reclaim its key, look it up again, then again.
    GONE = -44,
    -- rc_changed_t.status (src/ffi_engine.rs): import the dict's old value
    -- first; the same for a key whose dict value was no number.
    NEEDS_BASE = 1,
    FOREIGN = 3,
    -- rc_requests_record (src/ffi_engine.rs): in the window, or in the
    -- total only (the slot holds a newer window).
    IN_WINDOW = 0,
    TOTAL_ONLY = 1,
    -- rc_delta_t.status, DeltaStatus (src/pending.rs): a delta whose
    -- status is not DELTA_OK must stay pending.
    DELTA_OK = 0,
    DELTA_OUT_OF_EXACT_RANGE = 1,
    -- Op and Cmp (src/int64.rs), for rc_int_apply.
    OP_ADD = 0,
    OP_SUB = 1,
    OP_SET = 2,
    CMP_ALWAYS = 0,
    CMP_EQ = 1,
    CMP_NE = 2,
    CMP_LT = 3,
    CMP_LE = 4,
    CMP_GT = 5,
    CMP_GE = 6,
    -- A counter record (src/engine/counter.rs): its kind, the first byte
    -- of its key in the engine, and its width in cells.
    COUNTER_KIND = 99, -- ("c"):byte()
    COUNTER_WIDTH = 4,
    -- A strict record (src/engine/strict.rs): its kind and width.
    STRICT_KIND = 115, -- ("s"):byte()
    STRICT_WIDTH = 3,
    -- rc_lax_flush_begin (src/ffi_engine.rs): a new batch in flight,
    -- another flush running, the batch an earlier flush left (sent again
    -- under its id), nothing to send.
    LAX_NEW_BATCH = 0,
    LAX_BUSY = 1,
    LAX_LEFT_BATCH = 2,
    LAX_NOTHING = 3,
    -- rc_lax_flush_end (src/ffi_engine.rs): how the batch ended.
    LAX_APPLIED = 0,
    LAX_UNKNOWN = 1,
    LAX_NOT_SENT = 2,
    -- A limit record (src/engine/limit.rs): its kind and width.
    LIMIT_KIND = 119, -- ("w"):byte(): a window's counts
    LIMIT_WIDTH = 3,
}


local _M = {
    _VERSION = core._VERSION,
    -- The library through the FFI.
    C = C,
    -- The same library through mlua (`require "resty_counter_core"`): its
    -- cold paths (error messages, limits).
    core = core,
}


for name, value in pairs(codes) do
    _M[name] = value
end


-- syntax: msg = abi.failure(code)
--
-- The message for a negative code from the library. A caught panic also
-- carries the panic's own text, which the hook kept instead of printing.
function _M.failure(code)
    local msg = core.error_message(code)
    local panic_msg = core.take_panic_message()
    if panic_msg then
        msg = msg .. ": " .. panic_msg
    end
    return msg
end


-- syntax: s = abi.string(ptr, len)
--
-- ffi.string(ptr, len), a large string's memory backed by huge pages
-- where the kernel gives them on request (transparent huge pages in
-- `madvise` mode): LuaJIT maps a string of 128 KB or more afresh, and
-- writing into fresh 4 KB pages costs more than the copy (67 ms of page
-- faults for the 147 MB text of 100,000 keys against 15 ms; see src/lua.rs,
-- "Huge pages for a scrape's one big string"). For the scrapes' texts.
-- Raises as ffi.string does.
function _M.string(ptr, len)
    if len < ADVISED_BYTES then
        return ffi_string(ptr, len)
    end
    -- The VM's allocator is back in place whatever ffi.string did.
    advise_huge_strings(true)
    local ok, s = pcall(ffi_string, ptr, len)
    advise_huge_strings(false)
    if not ok then
        error(s, 2)
    end
    return s
end


return _M
