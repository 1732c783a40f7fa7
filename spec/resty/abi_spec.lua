-- abi.string inside a real nginx worker: the scrapes' big strings made with
-- their memory advised for huge pages (src/lua.rs, "Huge pages for a
-- scrape's one big string"), the same bytes as ffi.string, and the VM's
-- own allocator back in place after every call, a failed one too.

local ffi = require "ffi"
local abi = require "resty.counter.abi"

local core = abi.core
local C = ffi.C

ffi.cdef[[
void *malloc(size_t size);
void free(void *ptr);
void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);
int munmap(void *addr, size_t length);
int madvise(void *addr, size_t length, int advice);
void *memset(void *s, int c, size_t n);
]]


local MB = 1024 * 1024


-- A buffer of `bytes` whose bytes depend on `seed` (one marked every 4 KB,
-- the rest zero): LuaJIT interns strings, so two strings of equal bytes
-- would be one. Freed with the returned cdata.
local function buffer(bytes, seed)
    local ptr = ffi.gc(ffi.cast("unsigned char *", C.malloc(bytes)), C.free)
    assert(ptr ~= nil, "malloc")
    for i = 0, bytes - 1, 4096 do
        ptr[i] = (i / 4096 + seed) % 251
    end
    return ptr
end


-- The transparent huge pages mode: "always", "madvise" or "never".
local function thp_mode()
    local f = io.open("/sys/kernel/mm/transparent_hugepage/enabled")
    local text = f and f:read("*a") or ""
    if f then
        f:close()
    end
    return text:match("%[(%a+)%]")
end


-- The kB of huge pages backing the mapping of this process that holds
-- `address` (/proc/self/smaps' AnonHugePages), or nil when none holds it.
local function huge_kb_at(address)
    local f = assert(io.open("/proc/self/smaps"))
    local inside = false
    for line in f:lines() do
        local from, to = line:match("^(%x+)%-(%x+) ")
        if from then
            inside = tonumber(from, 16) <= address and address < tonumber(to, 16)
        elseif inside then
            local kb = line:match("^AnonHugePages:%s+(%d+) kB")
            if kb then
                f:close()
                return tonumber(kb)
            end
        end
    end
    f:close()
    return nil
end


-- Whether this kernel backs advised memory by huge pages now (they can
-- run out): 8 MB mapped here, advised, written, looked at.
local function huge_pages_given()
    local bytes = 8 * MB
    -- PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS
    local ptr = C.mmap(nil, bytes, 3, 0x22, -1, 0)
    assert(ffi.cast("intptr_t", ptr) ~= -1, "mmap")
    C.madvise(ptr, bytes, 14) -- MADV_HUGEPAGE
    C.memset(ptr, 1, bytes)
    local kb = huge_kb_at(tonumber(ffi.cast("uintptr_t", ptr)) + bytes / 2)
    C.munmap(ptr, bytes)
    return kb and kb > 0
end


-- The huge pages under the middle of string `s` (the first and last bytes
-- share a huge page with the block's header and what follows it).
local function huge_kb_of(s)
    local address = tonumber(ffi.cast("uintptr_t", ffi.cast("const char *", s)))
    local middle = address + math.floor(#s / 2)
    return assert(huge_kb_at(middle),
                  ("no mapping in /proc/self/smaps holds %x"):format(middle))
end


describe("abi.string", function()
    it("makes the same bytes as ffi.string, small and large", function()
        for _, bytes in ipairs({ 0, 1, 100, core.advised_string_bytes - 1,
                                 core.advised_string_bytes, 9 * MB + 3 }) do
            local ptr = buffer(math.max(bytes, 1), bytes)
            local s = abi.string(ptr, bytes)
            assert.equal(bytes, #s)
            assert.is_true(s == ffi.string(ptr, bytes), bytes .. " bytes differ")
        end
    end)

    it("backs a large string by huge pages where they are given on request", function()
        local mode = thp_mode()
        if mode ~= "madvise" then
            -- "always" backs the control below too; "never" neither.
            pending("transparent huge pages are " .. tostring(mode)
                    .. " here: only madvise tells the two apart")
            return
        end
        if not huge_pages_given() then
            pending("advised memory gets no huge pages here now")
            return
        end
        -- Two buffers: LuaJIT interns strings, and the second string of
        -- the same bytes would be the first.
        local bytes = 16 * MB
        local ptr, other = buffer(bytes, 1), buffer(bytes, 3)
        -- The control: the same size through ffi.string has none.
        local plain = ffi.string(other, bytes)
        assert.equal(0, huge_kb_of(plain))
        local advised = abi.string(ptr, bytes)
        assert.is_true(huge_kb_of(advised) > 0, "no huge pages under the string")
        -- A string below the size stays as ffi.string makes it.
        local small = abi.string(ptr + 1, core.advised_string_bytes - 1)
        assert.equal(0, huge_kb_of(small))
    end)

    it("puts the VM's allocator back after a failed call, and twice on is once", function()
        local ptr = buffer(16 * MB, 2)
        -- Past LuaJIT's longest string: raises, as ffi.string does.
        local ok, err = pcall(abi.string, ptr, 2 ^ 31)
        assert.is_false(ok)
        assert.is_string(err)
        local ok_plain = pcall(ffi.string, ptr, 2 ^ 31)
        assert.is_false(ok_plain)
        -- On twice, off once: the VM's own again (turned on twice, the
        -- stand-in would have remembered itself as the VM's).
        core.advise_huge_strings(true)
        core.advise_huge_strings(true)
        core.advise_huge_strings(false)
        core.advise_huge_strings(false)
        local s = ffi.string(ptr, 16 * MB)
        assert.equal(16 * MB, #s)
        if thp_mode() == "madvise" then
            -- Had the stand-in stayed in place, this string would have
            -- huge pages.
            assert.equal(0, huge_kb_of(s))
        end
        -- And a string made after all that still gets them.
        local advised = abi.string(ptr + 1, 16 * MB - 1)
        if thp_mode() == "madvise" and huge_pages_given() then
            assert.is_true(huge_kb_of(advised) > 0)
        end
    end)
end)
