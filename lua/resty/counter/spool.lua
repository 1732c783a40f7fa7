-- Copyright (C) lua-resty-counter-rs authors. Apache License 2.0.
--
-- The spool of lax counters on Redis: a batch an exiting worker could not
-- send (nginx's fast shutdown gives it no cosocket; at a graceful one
-- Redis may be unreachable) goes into a file of the spool directory, and
-- the next flush of a worker of the next start sends it under its own id
-- (the FLUSH script applies an id once), then removes the file.
--
-- A file holds one batch of one counter; its name and its first lines name
-- the counter's Redis key prefix (so a spool of another counter or config
-- is never sent to these keys) and the batch id. The file system part
-- (atomic write, 0600, listing) is src/spool.rs.


local abi = require "resty.counter.abi"
local int = require "resty.counter.int"


local core = abi.core
local concat = table.concat
local fmt = string.format
local floor = math.floor
local tonumber = tonumber
local tostring = tostring
local type = type
local io_open = io.open
local os_remove = os.remove
local ngx_time = ngx.time


local MAGIC = "resty-counter-lax-spool 1"


local _M = { _VERSION = "0.1.0" }


-- Bytes kept as they are in a file name; others become %XX.
local function escape(text)
    return (text:gsub("[^%w_.-]", function(c)
        return fmt("%%%02X", c:byte())
    end))
end


-- syntax: prefix = spool.file_prefix(key_prefix)
--
-- The start of the file names of the counter whose Redis keys start with
-- key_prefix.
function _M.file_prefix(key_prefix)
    return "lax-" .. escape(key_prefix) .. "-"
end


-- syntax: name, err = spool.write(dir, key_prefix, batch, maybe_sent)
--
-- Writes a batch ({ id, keys, deltas, ttls }) atomically as a file of its
-- own. maybe_sent: the batch may have reached Redis already (its id then
-- matters past the id's expiry: see spool.read).
function _M.write(dir, key_prefix, batch, maybe_sent)
    local count = #batch.keys
    local out = {
        MAGIC, "\n", #key_prefix, "\n", key_prefix, "\n", batch.id, "\n",
        ngx_time(), " ", maybe_sent and 1 or 0, " ", count, "\n",
    }
    for i = 1, count do
        local key, ttl = batch.keys[i], batch.ttls[i]
        out[#out + 1] = fmt("%d %s %d\n", #key, int.text(batch.deltas[i]),
                            ttl and floor(ttl * 1000 + 0.5) or 0)
        out[#out + 1] = key
        out[#out + 1] = "\n"
    end
    out[#out + 1] = "end\n"
    local name = _M.file_prefix(key_prefix) .. escape(batch.id) .. ".spool"
    local ok, err = core.spool_write(dir, name, concat(out))
    if not ok then
        return nil, err
    end
    return name
end


-- syntax: names, err = spool.list(dir, key_prefix)
function _M.list(dir, key_prefix)
    return core.spool_list(dir, _M.file_prefix(key_prefix))
end


-- syntax: stamp, recent = spool.stamp(dir)
-- syntax: nil, nil, err = spool.stamp(dir)
--
-- When dir last changed, and whether less than a second ago (src/spool.rs).
_M.stamp = core.spool_stamp


-- syntax: ok, err = spool.probe(dir)
_M.probe = core.spool_probe


-- syntax: batch, err = spool.read(path, key_prefix)
--
-- The batch of a spool file: { id, keys, deltas (decimal text), ttls
-- (seconds or false), maybe_sent, age (seconds since it was spooled) };
-- nil and an error when the file is not whole or is another counter's.
function _M.read(path, key_prefix)
    local file, err = io_open(path, "rb")
    if not file then
        return nil, err
    end
    local text = file:read("*a")
    file:close()
    if type(text) ~= "string" then
        return nil, "cannot read " .. path
    end

    local bad = "not a whole spool file: " .. path
    local magic_end = #MAGIC
    if text:sub(1, magic_end) ~= MAGIC then
        return nil, bad
    end
    local len_text, at = text:match("^\n(%d+)\n()", magic_end + 1)
    local len = tonumber(len_text)
    if not len or text:sub(at, at + len - 1) ~= key_prefix then
        return nil, "spool file of another counter: " .. path
    end
    local id, time, maybe, count, next_at =
        text:match("^\n([^\n]+)\n(%d+) ([01]) (%d+)\n()", at + len)
    if not id then
        return nil, bad
    end
    count = tonumber(count)
    local batch = {
        id = id, keys = {}, deltas = {}, ttls = {}, maybe_sent = maybe == "1",
        age = ngx_time() - tonumber(time),
    }
    at = next_at
    for i = 1, count do
        local key_len, delta, ttl_ms, key_at =
            text:match("^(%d+) (%-?%d+) (%d+)\n()", at)
        key_len = tonumber(key_len)
        if not key_len or text:sub(key_at + key_len, key_at + key_len)
                          ~= "\n"
        then
            return nil, bad
        end
        batch.keys[i] = text:sub(key_at, key_at + key_len - 1)
        batch.deltas[i] = delta
        ttl_ms = tonumber(ttl_ms)
        batch.ttls[i] = ttl_ms > 0 and ttl_ms / 1000 or false
        at = key_at + key_len + 1
    end
    if text:sub(at) ~= "end\n" then
        return nil, bad
    end
    return batch
end


-- syntax: ok, err = spool.remove(path)
function _M.remove(path)
    local ok, err = os_remove(path)
    if not ok then
        return nil, tostring(err)
    end
    return true
end


return _M
