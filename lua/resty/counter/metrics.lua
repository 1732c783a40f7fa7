-- Copyright (C) lua-resty-counter-rs authors. Apache License 2.0.
--
-- One Prometheus endpoint for the whole library: the keys of resty.counter
-- counters, the request counter's requests and latencies, the values of
-- strict and lax counters, the limiters' settings, and every module's own
-- figures (syncs, failures, refused keys, duplicates, dropped deltas,
-- pending keys, fail-open/closed decisions), summed over all workers of
-- the node.
--
-- A module's own figures are counted in each worker's Lua memory, where
-- no other worker can read them. So every worker publishes its figures to
-- a shared dict: each `interval` seconds (a lifecycle job), once more
-- when it exits (the premature tick, after the counters' syncs and
-- flushes; `lifecycle.exit()` in exit_worker_by_lua* for what comes after
-- it), and right before it renders. A counter is published as the
-- worker's increase since its last publication, added to the node's sum
-- with `incr`: the sum never goes down when a worker is reloaded or
-- replaced. A gauge (pending keys) is published as the worker's current
-- value under its worker id, and the render sums the ids of the running
-- workers. A scrape thus sees another worker's figures as they were at
-- most `interval` seconds ago, and its own as they are; the counts
-- themselves (keys, requests, values) live in shared memory and are read
-- as they are. The figures of the periodic jobs (resty.counter.lifecycle:
-- runs, failures, overruns, last duration) are exported as the library's
-- own, by job.


local abi = require "resty.counter.abi"
local check = require "resty.counter.check"
local counter = require "resty.counter"
local lax = require "resty.counter.lax"
local lifecycle = require "resty.counter.lifecycle"
local limit = require "resty.counter.limit"
local log = require "resty.counter.log"
local requests = require "resty.counter.requests"
local strict = require "resty.counter.strict"
local engine = require "resty.counter.engine"
local status = require "resty.counter.status"


local C = abi.C
local ngx = ngx
local ngx_shared = ngx.shared
local ngx_WARN = ngx.WARN
local ngx_now = ngx.now
local get_phase = ngx.get_phase
local worker_id = ngx.worker.id
local worker_count = ngx.worker.count
local dot_call = check.dot_call
local expected = check.expected
local log_failure = log.failure
local getmetatable = getmetatable
local ipairs = ipairs
local pairs = pairs
local pcall = pcall
local setmetatable = setmetatable
local tonumber = tonumber
local tostring = tostring
local type = type
local concat = table.concat
local sort = table.sort
local byte = string.byte
local find = string.find
local fmt = string.format
local gmatch = string.gmatch
local gsub = string.gsub
local match = string.match
local sub = string.sub


local SOURCE = "resty.counter.metrics"
local HUGE = 1 / 0
local EXACT = 2 ^ 53

-- The Content-Type of the text format.
local CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


local _M = { _VERSION = "0.1.0", content_type = CONTENT_TYPE,
             json_content_type = "application/json",
             status_content_type = "text/html; charset=utf-8" }
local mt = { __index = _M }


-- Every registry of this worker, for publish_all().
local registries = {}

-- The registry's lifecycle job (defined with publish, below).
local publish_job


-- A module's own figures: the field of its self_metrics(), the family it
-- is exported as, its type and its help. A gauge is the sum of the
-- workers' values, or with `max` their largest: for a figure every worker
-- observes of the same node-wide thing.
local function figure(field, family, type_, help, max)
    return { field = field, family = family, type = type_, help = help,
             max = max }
end


local COUNTER_FIGURES = {
    figure("syncs", "resty_counts_syncs_total", "counter",
           "Syncs of resty.counter's changed keys into the dict."),
    figure("failed", "resty_counts_sync_failures_total", "counter",
           "Keys a sync could not copy into the dict (copied by a later "
           .. "one)."),
    figure("out_of_range", "resty_counts_out_of_range_total", "counter",
           "Keys a sync could not copy for a value beyond +-(2^53 - 1)."),
    figure("refused", "resty_counts_refused_keys_total", "counter",
           "New keys refused because the shared engine was full."),
    figure("took_over", "resty_counts_takeovers_total", "counter",
           "Syncs of a worker that died during them, done again."),
    -- Each sync copies every changed key of the node: each worker's last
    -- one saw the same keys.
    figure("pending_keys", "resty_counts_pending_keys", "gauge",
           "Keys the last sync left uncopied into the dict (the largest "
           .. "of the workers' last syncs).", true),
}

local REQUESTS_FIGURES = {
    figure("overflowed", "resty_requests_overflowed_total", "counter",
           "Requests of keys past max_keys, recorded under the overflow "
           .. "key."),
    figure("refused", "resty_requests_refused_total", "counter",
           "Requests of new keys the shared engine had no room for, "
           .. "recorded under the overflow key."),
    figure("total_only", "resty_requests_late_total", "counter",
           "Requests whose window slot held a newer window: in the total "
           .. "only."),
    figure("cached", "resty_requests_cached_keys", "gauge",
           "Keys whose record the workers know."),
}

local STRICT_FIGURES = {
    figure("waits", "resty_strict_lock_waits_total", "counter",
           "Calls of strict counters that found a key's lock taken and "
           .. "waited."),
    figure("swept", "resty_strict_removed_keys_total", "counter",
           "Records of deleted and expired strict keys removed from the "
           .. "shared engine."),
}

local LAX_FIGURES = {
    figure("duplicates", "resty_lax_duplicates_total", "counter",
           "Batches sent again after a timeout that Redis had applied "
           .. "already (and did not apply twice)."),
    figure("dropped", "resty_lax_dropped_total", "counter",
           "Deltas given up: refused by Redis, or Redis unreachable with "
           .. "more than max_pending keys pending."),
    figure("pending_keys", "resty_lax_pending_keys", "gauge",
           "Keys whose deltas wait for a flush."),
    figure("waits", "resty_lax_lock_waits_total", "counter",
           "Calls of lax counters that found a key's lock taken and "
           .. "waited."),
}

local LIMIT_FIGURES = {
    figure("allowed", "resty_limit_allowed_total", "counter",
           "Events a limiter allowed (committed events; dry runs are not "
           .. "counted)."),
    figure("near_limit", "resty_limit_near_limit_total", "counter",
           "Allowed events after which the window was at least "
           .. "near_limit_ratio of the limit (part of the allowed)."),
    figure("rejected", "resty_limit_rejected_total", "counter",
           "Events a limiter rejected for being over the limit."),
    figure("shadow_rejected", "resty_limit_shadow_rejected_total",
           "counter", "Events over the limit that a limiter in shadow mode "
           .. "let through."),
    figure("failed_open", "resty_limit_failed_open_total", "counter",
           "Events allowed because Redis could not answer "
           .. "(on_redis_error = \"allow\")."),
    figure("failed_closed", "resty_limit_failed_closed_total", "counter",
           "Events rejected because Redis could not answer "
           .. "(on_redis_error = \"reject\")."),
}

-- The periodic jobs' figures (resty.counter.lifecycle), by job.
local LIFECYCLE_FIGURES = {
    figure("runs", "resty_lifecycle_runs_total", "counter",
           "Runs of a periodic job (syncs, flushes, publications): ticks "
           .. "and final runs."),
    figure("failures", "resty_lifecycle_failures_total", "counter",
           "Runs of a periodic job that returned an error or raised."),
    figure("overruns", "resty_lifecycle_overruns_total", "counter",
           "Ticks of a periodic job skipped because its previous run still "
           .. "ran."),
    figure("deferred", "resty_lifecycle_deferred_total", "counter",
           "Ticks of a periodic job skipped while it waited to retry after "
           .. "a failure."),
    figure("last_duration", "resty_lifecycle_last_duration_seconds",
           "gauge", "Duration of a periodic job's last run (the longest "
                    .. "of the workers' last runs).", true),
}

-- The engine's figures, node-wide already (read, not summed).
local ENGINE_FIGURES = {
    figure("keys", "resty_engine_keys", "gauge",
           "Keys in the shared engine of the dict."),
    figure("max_keys", "resty_engine_max_keys", "gauge",
           "Keys the shared engine of the dict can hold."),
    figure("refused", "resty_engine_refused_keys_total", "counter",
           "New keys the shared engine refused because it was full."),
    figure("bytes", "resty_engine_bytes", "gauge",
           "Size of the shared engine in the dict's zone."),
    figure("used_bytes", "resty_engine_used_bytes", "gauge",
           "Bytes of the shared engine's records, free ones included."),
    figure("free_bytes", "resty_engine_free_bytes", "gauge",
           "Bytes of removed records waiting to be reused."),
    figure("arena_bytes", "resty_engine_arena_bytes", "gauge",
           "Bytes the shared engine has for records."),
    figure("removed", "resty_engine_removed_keys_total", "counter",
           "Keys removed from the shared engine (idle, stale, deleted "
           .. "or expired ones)."),
}

local DEFAULT_KEYS_FAMILY = "resty_counts_total"
local DEFAULT_KEYS_HELP = "Counts of resty.counter, by dict and key."

-- The families of the request counter's own rendering.
local REQUEST_FAMILIES = {
    resty_requests_total = true, resty_request_latency_seconds = true,
    resty_requests_window_rate = true, resty_requests_tracked_keys = true,
    resty_requests_engine_used_bytes = true,
    resty_requests_engine_bytes = true,
}

-- Family names a user's metric may not take: the library's own.
local RESERVED = { resty_strict_value = true, resty_lax_value = true,
                   resty_limit_max_events = true,
                   resty_limit_window_seconds = true }
for name in pairs(REQUEST_FAMILIES) do
    RESERVED[name] = true
end
for _, figures in ipairs({ COUNTER_FIGURES, REQUESTS_FIGURES, STRICT_FIGURES,
                            LAX_FIGURES, LIMIT_FIGURES, ENGINE_FIGURES,
                            LIFECYCLE_FIGURES }) do
    for _, f in ipairs(figures) do
        RESERVED[f.family] = true
    end
end


-- Text format ------------------------------------------------------------


-- A value as the text format writes it: integers exactly, others in the
-- fewest digits that read back the same; a base-10 string (a strict
-- counter's value beyond 2^53) as it is.
local function number_text(v)
    if type(v) == "string" then
        return v
    end
    if v ~= v then
        return "NaN"
    end
    if v == HUGE then
        return "+Inf"
    end
    if v == -HUGE then
        return "-Inf"
    end
    if v % 1 == 0 and v > -EXACT and v < EXACT then
        return fmt("%d", v)
    end
    local text = fmt("%.15g", v)
    if tonumber(text) ~= v then
        text = fmt("%.17g", v)
    end
    return text
end
_M._number_text = number_text


local SPECIAL_VALUES = { NaN = 0 / 0, ["+Inf"] = HUGE, ["-Inf"] = -HUGE,
                         inf = HUGE, ["-inf"] = -HUGE }

local LABEL_ESCAPES = { ["\\"] = "\\\\", ['"'] = '\\"', ["\n"] = "\\n" }
local HELP_ESCAPES = { ["\\"] = "\\\\", ["\n"] = "\\n" }


local function hex_byte(c)
    return fmt("\\x%02x", byte(c))
end


-- A key as UTF-8 text: a label value and a JSON string must be UTF-8, and
-- a key may be any bytes; a key that is not UTF-8 shows its bytes from
-- 0x80 on as \xNN.
local function utf8_text(value)
    if type(value) ~= "string" then
        value = tostring(value)
    end
    if C.rc_utf8_valid(value, #value) == 0 then
        value = gsub(value, "[\128-\255]", hex_byte)
    end
    return value
end


local function label_value(value)
    return (gsub(utf8_text(value), '[\\"\n]', LABEL_ESCAPES))
end
_M._label_value = label_value


-- `{a="x",b="y"}` from label names in order and a table of their values;
-- a label whose value is nil or "" is left out (Prometheus treats the two
-- alike). "" when there is none.
local function labels_text(names, values)
    local parts = {}
    for i = 1, #names do
        local name = names[i]
        local value = values[name]
        if value ~= nil and value ~= "" then
            parts[#parts + 1] = name .. '="' .. label_value(value) .. '"'
        end
    end
    if #parts == 0 then
        return ""
    end
    return "{" .. concat(parts, ",") .. "}"
end


-- The families to write, in the order first met, each with its samples
-- in the order first met; a sample met again (the same name and labels)
-- is added to the first, so that no series is written twice.
local function exposition()
    return { families = {}, by_name = {} }
end


local function family(expo, name, type_, help)
    local f = expo.by_name[name]
    if not f then
        f = { name = name, type = type_, help = help, index = {},
              names = {}, labels = {}, values = {} }
        expo.by_name[name] = f
        expo.families[#expo.families + 1] = f
    end
    return f
end


local function sample(f, name, labels, value)
    local id = name .. labels
    local i = f.index[id]
    if i then
        f.values[i] = tonumber(f.values[i]) + tonumber(value)
        return
    end
    i = #f.values + 1
    f.index[id] = i
    f.names[i] = name
    f.labels[i] = labels
    f.values[i] = value
end


-- The labels of lines written elsewhere (the engine's rendering of a
-- counter's keys), which a family holds in the place of a sample.
local LINES = {}


-- Adds `text`, lines of samples rendered elsewhere, each ending in a
-- newline, to family `f`: written as they are, in their place among its
-- samples. The caller makes sure that no other sample has their labels.
local function sample_lines(f, text)
    if text ~= "" then
        local i = #f.values + 1
        f.names[i] = sub(text, 1, -2)
        f.labels[i] = LINES
        f.values[i] = 0
    end
end


local function exposition_text(expo)
    local lines = {}
    for _, f in ipairs(expo.families) do
        local values = f.values
        if #values > 0 then
            lines[#lines + 1] = "# HELP " .. f.name .. " "
                                .. gsub(f.help, "[\\\n]", HELP_ESCAPES)
            lines[#lines + 1] = "# TYPE " .. f.name .. " " .. f.type
            for i = 1, #values do
                local labels = f.labels[i]
                if labels == LINES then
                    lines[#lines + 1] = f.names[i]
                else
                    lines[#lines + 1] = f.names[i] .. labels .. " "
                                        .. number_text(values[i])
                end
            end
        end
    end
    lines[#lines + 1] = ""
    return concat(lines, "\n")
end


-- Adds a rendering in the text format (the request counter's) to `expo`:
-- its families merge with those of the same name.
local function merge_text(expo, text)
    local helps, current = {}, nil
    for line in gmatch(text, "[^\n]+") do
        if byte(line, 1) == 35 then     -- "#"
            local kind, name, rest = match(line, "^# (%u+) ([%w_:]+) ?(.*)$")
            if kind == "HELP" then
                helps[name] = gsub(rest, "\\(.)", { ["\\"] = "\\",
                                                    n = "\n" })
            elseif kind == "TYPE" then
                current = family(expo, name, rest, helps[name] or name)
            end
        elseif current then
            local name = match(line, "^[%w_:]+")
            local value = match(line, " (%S+)$")
            if name and value then
                local labels = sub(line, #name + 1, #line - #value - 1)
                local n = tonumber(value) or SPECIAL_VALUES[value]
                if n then
                    sample(current, name, labels, n)
                end
            end
        end
    end
end
_M._merge_text = merge_text


-- JSON -------------------------------------------------------------------


-- Marks a table as a JSON array (an empty one would be an object), and
-- one whose [1] is JSON text to embed as it is (the request counter's own
-- stats, which its encoder escaped).
local ARRAY = {}
local RAW = {}


local function array(t)
    return setmetatable(t or {}, ARRAY)
end


-- Control characters, quotes and backslashes as JSON needs them; <, > and
-- & too, so that no JSON text holds markup (a browser that sniffs, JSON
-- put in a <script>); U+2028 and U+2029, line ends to older JavaScript.
local JSON_ESCAPES = {
    ['"'] = '\\"', ["\\"] = "\\\\", ["\b"] = "\\b", ["\f"] = "\\f",
    ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t",
    ["\226\128\168"] = "\\u2028", ["\226\128\169"] = "\\u2029",
}


local function json_escape(c)
    return JSON_ESCAPES[c] or fmt("\\u%04x", byte(c))
end


-- A JSON string: any bytes, as utf8_text() shows them.
local function json_string(value)
    value = gsub(utf8_text(value), '[%c"\\<>&]', json_escape)
    return '"' .. gsub(value, "\226\128[\168\169]", json_escape) .. '"'
end
_M._json_string = json_string


local json_value

local function json_table(t, out)
    local class = getmetatable(t)
    if class == RAW then
        out[#out + 1] = t[1]
    elseif class == ARRAY or t[1] ~= nil then
        out[#out + 1] = "["
        for i = 1, #t do
            if i > 1 then
                out[#out + 1] = ","
            end
            json_value(t[i], out)
        end
        out[#out + 1] = "]"
    else
        local names = {}
        for name in pairs(t) do
            names[#names + 1] = tostring(name)
        end
        sort(names)
        out[#out + 1] = "{"
        for i, name in ipairs(names) do
            out[#out + 1] = (i > 1 and "," or "") .. json_string(name) .. ":"
            json_value(t[name], out)
        end
        out[#out + 1] = "}"
    end
end


-- Appends the JSON of `v` to the list `out`: numbers as number_text()
-- writes them (integers exactly), those JSON has no word for (NaN, the
-- infinities) as null; a table as an array (ARRAY, or with a [1]), as
-- raw JSON (RAW) or as an object with its names in order.
json_value = function(v, out)
    local t = type(v)
    if t == "string" then
        out[#out + 1] = json_string(v)
    elseif t == "number" then
        out[#out + 1] = (v ~= v or v == HUGE or v == -HUGE) and "null"
                        or number_text(v)
    elseif t == "boolean" then
        out[#out + 1] = tostring(v)
    elseif t == "table" then
        json_table(v, out)
    else
        out[#out + 1] = "null"
    end
end


local function json_text(v)
    local out = {}
    json_value(v, out)
    return concat(out)
end
_M._json_text = json_text


-- Options ----------------------------------------------------------------


local function is_metric_name(v)
    return type(v) == "string" and find(v, "^[%a_:][%w_:]*$") ~= nil
end


local function is_label_name(v)
    return type(v) == "string" and find(v, "^[%a_][%w_]*$") ~= nil
           and sub(v, 1, 2) ~= "__"
end


local TYPES = { counter = true, gauge = true }

local NEW_OPTIONS = { interval = true, name = true }
local COUNTER_OPTIONS = { name = true, help = true, type = true,
                          labels = true, separator = true }
local VALUES_OPTIONS = { values = true }
local NO_OPTIONS = {}


-- The kind of object `obj` is, from its class.
local CLASSES = {
    [counter] = "counter", [requests] = "requests", [strict] = "strict",
    [lax] = "lax", [limit] = "limit",
}


local function kind_of(obj)
    if type(obj) ~= "table" then
        return nil
    end
    local class = getmetatable(obj)
    return class and CLASSES[class.__index]
end


-- How a resty.counter's keys become samples: the family, and the labels
-- of each key.
local function key_mapping(opts, level)
    level = level + 1
    local type_ = opts.type or "counter"
    if not TYPES[type_] then
        expected("opts.type", '"counter" or "gauge"', opts.type, level)
    end

    local name = opts.name
    if name == nil then
        if type_ ~= "counter" then
            expected("opts.name", "a metric name (there is no default for "
                     .. "a gauge)", name, level)
        end
        name = DEFAULT_KEYS_FAMILY
    elseif not is_metric_name(name) then
        expected("opts.name", "a metric name ([a-zA-Z_:][a-zA-Z0-9_:]*)",
                 name, level)
    elseif RESERVED[name] then
        expected("opts.name", "a name that is not one of the library's own "
                 .. "metrics", name, level)
    elseif type_ == "counter" and sub(name, -6) ~= "_total" then
        expected("opts.name", 'a counter\'s name, ending in "_total"', name,
                 level)
    end
    local help = check.text(opts.help, "opts.help", level,
                            name == DEFAULT_KEYS_FAMILY and DEFAULT_KEYS_HELP
                            or "Counts of resty.counter, by key.")

    local labels = opts.labels
    local separator = opts.separator
    if labels == nil then
        if separator ~= nil then
            expected("opts.separator", "nil (it splits keys into "
                     .. "opts.labels, which is not given)", separator, level)
        end
    elseif type(labels) == "table" then
        if #labels == 0 then
            expected("opts.labels", "a non-empty list of label names",
                     labels, level)
        end
        local seen = {}
        for i, label in pairs(labels) do
            local at = "opts.labels[" .. tostring(i) .. "]"
            if type(i) ~= "number" or i % 1 ~= 0 or i < 1 or i > #labels then
                expected("opts.labels", "a list of label names", labels,
                         level)
            end
            if not is_label_name(label) then
                expected(at, "a label name ([a-zA-Z_][a-zA-Z0-9_]*, not "
                         .. "starting with __)", label, level)
            end
            if seen[label] then
                expected(at, "a label name not given twice", label, level)
            end
            seen[label] = true
        end
        -- A copy: the caller's list may change later.
        local names = {}
        for i = 1, #labels do
            names[i] = labels[i]
        end
        labels = names
        separator = check.text(separator, "opts.separator", level, ":")
    elseif type(labels) == "function" then
        if separator ~= nil then
            expected("opts.separator", "nil (opts.labels is a function)",
                     separator, level)
        end
    else
        expected("opts.labels", "a list of label names or a function",
                 labels, level)
    end

    return { family = name, type = type_, help = help, labels = labels,
             separator = separator }
end


local DEFAULT_LABELS = { "dict", "key" }


-- The labels of `key` as text, or nil to leave the key out. A labels
-- function that returns no table of strings raises, blaming the caller of
-- render() (`level`).
local function key_labels(mapping, dict_name, key, level)
    local labels = mapping.labels
    if labels == nil then
        return labels_text(DEFAULT_LABELS, { dict = dict_name, key = key })
    end

    if type(labels) == "function" then
        local values = labels(key)
        if values == nil then
            return nil
        end
        if type(values) ~= "table" then
            expected("opts.labels", "a function returning a table or nil "
                     .. "(for key " .. check.describe(key) .. ")", values,
                     level + 1)
        end
        local names = {}
        for name, value in pairs(values) do
            if not is_label_name(name) then
                expected("opts.labels", "a function returning label names "
                         .. "(for key " .. check.describe(key) .. ")", name,
                         level + 1)
            end
            if type(value) ~= "string" and type(value) ~= "number" then
                expected("opts.labels", "a function returning string values "
                         .. "(for label " .. name .. ")", value, level + 1)
            end
            names[#names + 1] = name
        end
        sort(names)
        return labels_text(names, values)
    end

    -- A list of names: the key's parts between separators, the last label
    -- taking the rest of the key.
    local separator = mapping.separator
    local values, pos, n = {}, 1, #labels
    for i = 1, n do
        if i == n then
            values[labels[i]] = sub(key, pos)
            break
        end
        local from, to = find(key, separator, pos, true)
        if not from then
            values[labels[i]] = sub(key, pos)
            break
        end
        values[labels[i]] = sub(key, pos, from - 1)
        pos = to + 1
    end
    return labels_text(labels, values)
end


-- Registry ---------------------------------------------------------------


-- syntax: m, err = metrics.new(shdict_name, opts?)
--
-- context: init_worker_by_lua* and later phases (it creates a timer)
--
-- A registry of the objects whose figures the endpoint renders. Its
-- workers publish their figures to the dict `shdict_name` (a dict of its
-- own: a few hundred bytes per figure and worker; 1m is plenty), every
-- opts.interval seconds (default 1). opts.name (default "metrics", letters,
-- digits, "_", "." or "-") names the registry in the dict, for a dict
-- shared by two of them. Make it in init_worker_by_lua*, and add the same
-- objects in the same order in every worker. An unknown option raises.
function _M.new(shdict_name, opts)
    check.string(shdict_name, "shdict_name", 2)
    opts = check.table(opts, "opts", 2)
    check.options(opts, NEW_OPTIONS, "opts", 2)
    local interval = check.seconds(opts.interval, "opts.interval", 2, 1)
    local name = check.name(opts.name, "opts.name", 2, "metrics")

    local dict = ngx_shared[shdict_name]
    if not dict then
        return nil, 'shared dict "' .. shdict_name .. '" not found'
    end
    for _, other in ipairs(registries) do
        if other.dict_name == shdict_name and other.name == name then
            return nil, 'dict "' .. shdict_name .. '" already has a '
                        .. 'registry named "' .. name .. '" in this worker'
        end
    end
    if get_phase() == "init" then
        return nil, "cannot create the publishing timer in init_by_lua*: "
                    .. "create the registry in init_worker_by_lua*"
    end

    local self = setmetatable({
        dict = dict,
        dict_name = shdict_name,
        name = name,
        interval = interval,
        counter_key = "c|" .. name .. "|",
        gauge_key = "g|" .. name .. "|",
        entries = {},           -- what was added, in order
        added = {},             -- object -> true
        published = {},         -- series -> the counter value published
    }, mt)

    local ok, err = lifecycle.every("resty.counter.metrics publish "
                                    .. shdict_name .. "/" .. name, interval,
                                    publish_job, self,
                                    { order = lifecycle.ORDER_PUBLISH })
    if not ok then
        return nil, "failed to create the publishing timer: " .. err
    end
    registries[#registries + 1] = self
    return self
end


-- Gives `entry` the labels of its own figures: names in order and their
-- values, and as text.
local function set_labels(entry, names, values)
    entry.label_names = names
    entry.label_values = values
    entry.labels = labels_text(names, values)
end


-- syntax: m:add(obj, opts?)
--
-- context: where `metrics.new` is called
--
-- Adds an object of this library to what the endpoint renders: a
-- resty.counter counter, a request counter (resty.counter.requests, or
-- the table resty.greencheek.request.counter's configure() returns), a
-- strict or lax counter, or a limiter. For a resty.counter counter, opts:
-- name (the metric, default "resty_counts_total"), type ("counter", the
-- default, or "gauge"), help, and labels: by default {dict=, key=}; a list
-- of label names splits each key at opts.separator (default ":"), the last
-- label taking the rest; a function(key) returns a table of label names to
-- values, or nil to leave the key out. For a strict or lax counter,
-- opts.values (default true) renders its keys' values (on a dict; on
-- Redis there are none to list). Raises on misuse, on an object added
-- twice and on an unknown option.
function _M.add(self, obj, opts)
    if getmetatable(self) ~= mt then
        dot_call("m", "add", 2)
    end
    local kind = kind_of(obj)
    if not kind then
        expected("obj", "a counter, request counter, strict or lax counter "
                 .. "or limiter of resty.counter", obj, 2)
    end
    if self.added[obj] then
        expected("obj", "an object not added before", obj, 2)
    end
    opts = check.table(opts, "opts", 2)

    local entry = { kind = kind, obj = obj }
    if kind == "counter" then
        check.options(opts, COUNTER_OPTIONS, "opts", 2)
        local mapping = key_mapping(opts, 2)
        for _, other in ipairs(self.entries) do
            local m = other.mapping
            if m and m.family == mapping.family and m.type ~= mapping.type
            then
                expected("opts.type", '"' .. m.type .. '", as metric "'
                         .. m.family .. '" has', opts.type, 2)
            end
        end
        entry.mapping = mapping
        set_labels(entry, { "dict" }, { dict = obj.dict_name })
        entry.figures = COUNTER_FIGURES
    elseif kind == "requests" then
        check.options(opts, NO_OPTIONS, "opts", 2)
        set_labels(entry, { "dict" }, { dict = obj.dict_name })
        entry.figures = REQUESTS_FIGURES
    elseif kind == "limit" then
        check.options(opts, NO_OPTIONS, "opts", 2)
        set_labels(entry, { "limiter" }, { limiter = sub(obj.prefix, 1, -2) })
        entry.figures = LIMIT_FIGURES
    else
        check.options(opts, VALUES_OPTIONS, "opts", 2)
        entry.values = check.flag(opts.values, "opts.values", 2, true)
        local shared = kind == "lax" and obj.shared or obj
        entry.shared = shared
        set_labels(entry, { "dict", "name" },
                   { dict = obj.dict_name, name = shared.name })
        entry.figures = kind == "lax" and LAX_FIGURES or STRICT_FIGURES
    end

    self.added[obj] = true
    self.entries[#self.entries + 1] = entry
end


-- The entries of the registry's objects, then one per periodic job of
-- this worker (its figures read from lifecycle.jobs()).
local function all_entries(self)
    local entries = {}
    for i, entry in ipairs(self.entries) do
        entries[i] = entry
    end
    for _, job in ipairs(lifecycle.jobs()) do
        local entry = { kind = "lifecycle", figures = LIFECYCLE_FIGURES,
                        values = job }
        set_labels(entry, { "job" }, { job = job.name })
        entries[#entries + 1] = entry
    end
    return entries
end


-- An object's own figures in this worker, as self_metrics() gives them
-- (a lax counter's lock waits are its strict store's), or a job's.
local function figures_of(entry)
    if entry.kind == "lifecycle" then
        return entry.values
    end
    local values = entry.obj:self_metrics()
    if entry.kind == "lax" then
        values.waits = entry.shared.waits
    end
    return values
end


-- This worker's figures: { [series] = value } for counters and gauges,
-- summed over the objects that share a series.
local function collect(self)
    local counters, gauges = {}, {}
    for _, entry in ipairs(all_entries(self)) do
        local values = figures_of(entry)
        for _, f in ipairs(entry.figures) do
            local series = f.family .. entry.labels
            local sums = f.type == "counter" and counters or gauges
            sums[series] = (sums[series] or 0) + (values[f.field] or 0)
        end
    end
    return counters, gauges
end


-- Publishes this worker's figures: the body of m:publish().
local function publish(self)
    local dict = self.dict
    local published = self.published
    local counters, gauges = collect(self)
    local first_err
    for series, value in pairs(counters) do
        local last = published[series] or 0
        if value ~= last then
            local ok, err = dict:incr(self.counter_key .. series,
                                      value - last, 0)
            if ok then
                published[series] = value
            else
                first_err = first_err or err
            end
        end
    end

    local prefix = self.gauge_key .. (worker_id() or 0) .. "|"
    for series, value in pairs(gauges) do
        local ok, err = dict:safe_set(prefix .. series, value)
        if not ok then
            first_err = first_err or err
        end
    end

    if first_err then
        local err = 'cannot publish to dict "' .. self.dict_name .. '": '
                    .. first_err
        log_failure(SOURCE, err)
        return nil, err
    end
    return true
end


-- Every tick, and at reload, shutdown and exit_worker_by_lua* after the
-- counters' final syncs and flushes: shared dicts work there.
publish_job = function(self)
    return publish(self)
end


-- syntax: ok, err = m:publish()
--
-- context: any phase where shared dicts work (all of them)
--
-- Publishes this worker's figures to the dict: the timer does it every
-- interval, and render() before it reads. `nil, err` when the dict could
-- not take them (logged; the next publication tries again).
function _M.publish(self)
    if getmetatable(self) ~= mt then
        dot_call("m", "publish", 2)
    end
    return publish(self)
end


-- syntax: ok = metrics.publish_all()
--
-- context: any phase; meant for exit_worker_by_lua*
--
-- Publishes the figures of every registry of this worker. Never raises;
-- nil when one failed. In exit_worker_by_lua_block it runs the final work
-- of every periodic job of the worker (lifecycle.exit(): resty.counter's
-- syncs, lax flushes, then these publications), so that what the worker
-- counted after its last tick reaches the node's sums.
function _M.publish_all()
    if get_phase() == "exit_worker" then
        return lifecycle.exit()
    end
    local ok = true
    for _, registry in ipairs(registries) do
        local fine, published = pcall(publish, registry)
        if not (fine and published) then
            ok = nil
        end
    end
    return ok
end


-- Rendering --------------------------------------------------------------


-- Whether the engine renders the keys of counters (metrics._engine_keys
-- = false: Lua does, as before; for tests that compare the two).
_M._engine_keys = true


-- The families whose counters' keys the engine renders (see
-- render_keys): those whose every counter reads the engine (it has a
-- sync interval) and maps keys by default or by a list of names, and
-- where no two counters can write the same series: one counter alone, or
-- several mapped by default, each of another dict.
local function engine_families(entries)
    local by_family = {}
    for _, entry in ipairs(entries) do
        if entry.kind == "counter" then
            local mapping, dict_name = entry.mapping, entry.obj.dict_name
            local name = mapping.family
            local fit = _M._engine_keys and entry.obj.exact
                        and type(mapping.labels) ~= "function"
            local seen = by_family[name]
            if not seen then
                by_family[name] = { fit = fit, [dict_name] = true,
                                    listed = mapping.labels ~= nil }
            else
                if seen[dict_name] or seen.listed or mapping.labels ~= nil
                then
                    fit = false
                end
                seen.fit = seen.fit and fit
                seen[dict_name] = true
            end
        end
    end
    local families = {}
    for name, seen in pairs(by_family) do
        families[name] = seen.fit or nil
    end
    return families
end


-- Renders a counter's keys in the engine (`by_engine`: its family is one
-- of engine_families()): every key it holds, sorted, the value c:get
-- reads, in one pass and without a lock, the lines the Lua code below
-- writes; or, when the engine cannot, in Lua: the dict's keys (those
-- synced), each read with c:get.
local function render_keys(expo, entry, level, by_engine)
    local obj, mapping = entry.obj, entry.mapping
    local f = family(expo, mapping.family, mapping.type, mapping.help)
    if by_engine then
        local labels = mapping.labels
        local text, err = counter._prometheus_text(
            obj, mapping.family, labels and concat(labels, ","),
            mapping.separator)
        if text then
            sample_lines(f, text)
            return
        end
        log_failure(SOURCE, 'keys of dict "' .. obj.dict_name .. '" '
                    .. 'rendered in Lua: ' .. tostring(err), nil, ngx_WARN)
    end

    local dict_name = obj.dict_name
    local keys = obj:get_keys(0)
    sort(keys)
    for _, key in ipairs(keys) do
        local value = obj:get(key)
        if type(value) == "number" then
            local labels = key_labels(mapping, dict_name, key, level + 1)
            if labels then
                sample(f, mapping.family, labels, value)
            end
        end
    end
end


local VALUE_HELP = {
    strict = "Values of strict counters, by dict, name and key.",
    lax = "Values of lax counters in the dict (without the deltas workers "
          .. "have not flushed yet), by dict, name and key.",
}


local function render_values(expo, entry)
    local values = entry.shared:_values()
    if not values then
        return
    end
    local name = "resty_" .. entry.kind .. "_value"
    local f = family(expo, name, "gauge", VALUE_HELP[entry.kind])
    local keys = {}
    for key in pairs(values) do
        keys[#keys + 1] = key
    end
    sort(keys)
    local store_name = entry.shared.name
    for _, key in ipairs(keys) do
        local value = values[key]
        local t = type(value)
        if t == "number" or t == "string" and find(value, "^%-?%d+$") then
            sample(f, name, labels_text({ "dict", "key", "name" },
                                        { dict = entry.obj.dict_name,
                                          key = key, name = store_name }),
                   value)
        end
    end
end


local function render_limit(expo, entry)
    local lim = entry.obj
    local labels = labels_text({ "algorithm", "limiter" },
                               { algorithm = lim.algorithm,
                                 limiter = sub(lim.prefix, 1, -2) })
    sample(family(expo, "resty_limit_max_events", "gauge",
                  "Events a limiter allows per window and key."),
           "resty_limit_max_events", labels, lim.limit)
    sample(family(expo, "resty_limit_window_seconds", "gauge",
                  "The window of a limiter."),
           "resty_limit_window_seconds", labels, lim.window)
end


-- The node's sum of figure `f` of `entry`: of the workers' published
-- values.
local function node_value(self, entry, f)
    local dict = self.dict
    local series = f.family .. entry.labels
    if f.type == "counter" then
        return dict:get(self.counter_key .. series) or 0
    end
    local value = 0
    for id = 0, worker_count() - 1 do
        local v = dict:get(self.gauge_key .. id .. "|" .. series) or 0
        if not f.max then
            value = value + v
        elseif v > value then
            value = v
        end
    end
    return value
end


-- Calls emit(f, names, values, value) for every own figure of the node,
-- each series once: figure `f`, its labels (names in order, and values)
-- and its value; first the workers' sums, then the shared engines'
-- figures, once per dict.
local function each_figure(self, emit)
    local done = {}
    for _, entry in ipairs(all_entries(self)) do
        for _, f in ipairs(entry.figures) do
            local series = f.family .. entry.labels
            if not done[series] then
                done[series] = true
                emit(f, entry.label_names, entry.label_values,
                     node_value(self, entry, f))
            end
        end
    end

    local engines = {}
    for _, entry in ipairs(self.entries) do
        local kind = entry.kind
        local dict_name = entry.obj.dict_name
        if (kind == "counter" or kind == "requests")
           and not engines[dict_name]
        then
            engines[dict_name] = true
            local handle = engine.attach(dict_name)
            if handle then
                local stats = engine.stats(handle)
                for _, f in ipairs(ENGINE_FIGURES) do
                    emit(f, { "dict" }, { dict = dict_name }, stats[f.field])
                end
            end
        end
    end
end


-- syntax: text = m:render()
--
-- context: any phase; meant for content_by_lua*
--
-- Everything the registry's objects hold, in the Prometheus text format
-- (version 0.0.4; serve it with Content-Type `metrics.content_type`):
-- each family once, with its HELP and TYPE, no series twice (keys that
-- map to the same labels are summed). Lists the keys of the counters'
-- dicts (`get_keys(0)`, which locks each dict while it lists). A request
-- counter that cannot render is left out and logged. A labels function
-- that returns something else than a table of label names to strings
-- raises.
function _M.render(self)
    if getmetatable(self) ~= mt then
        dot_call("m", "render", 2)
    end
    publish(self)

    local expo = exposition()
    local by_engine = engine_families(self.entries)
    for _, entry in ipairs(self.entries) do
        local kind = entry.kind
        if kind == "counter" then
            render_keys(expo, entry, 2, by_engine[entry.mapping.family])
        elseif kind == "requests" then
            local text, err = entry.obj:prometheus()
            if text then
                merge_text(expo, text)
            else
                log_failure(SOURCE, 'request counter of dict "'
                            .. entry.obj.dict_name .. '" left out: '
                            .. tostring(err), nil, ngx_WARN)
            end
        elseif kind == "limit" then
            render_limit(expo, entry)
        elseif entry.values then
            render_values(expo, entry)
        end
    end
    each_figure(self, function(f, names, values, value)
        sample(family(expo, f.family, f.type, f.help), f.family,
               labels_text(names, values), value)
    end)
    return exposition_text(expo)
end


-- A limiter's settings and the node's sums of its decisions.
local function limit_json(self, entry)
    local lim = entry.obj
    local doc = {
        limiter = entry.label_values.limiter, algorithm = lim.algorithm,
        limit = lim.limit, window = lim.window, shadow = lim.shadow,
        near_limit_ratio = lim.near_limit_ratio,
        redis = lim.engine ~= nil,
    }
    for _, f in ipairs(LIMIT_FIGURES) do
        doc[f.field] = node_value(self, entry, f)
    end
    return doc
end


-- A list of { key =, value = } in the order of the keys.
local function key_values(keys, value_of)
    sort(keys)
    local list = array()
    for _, key in ipairs(keys) do
        local value = value_of(key)
        if value ~= nil then
            list[#list + 1] = { key = key, value = value }
        end
    end
    return list
end


-- syntax: text = m:json()
--
-- context: any phase; meant for content_by_lua*
--
-- What render() renders, as one JSON object (serve it with Content-Type
-- `metrics.json_content_type`); the status page reads it:
--
-- * time: ngx.now() when it was made;
-- * counters: per resty.counter counter {dict, metric, keys}, keys a list
--   of {key, value} in the order of the keys (every key, whatever the
--   counter's labels option leaves out of render());
-- * requests: per request counter {dict, stats}, stats being the request
--   counter's own stats() (per key: its windows with requests, rate, p50,
--   p90, p99, max), or {dict, error} when it could not give them;
-- * values: per strict or lax counter with values {kind, dict, name,
--   keys} (a value beyond 2^53 is a string of its digits);
-- * limits: per limiter {limiter, algorithm, limit, window, shadow,
--   near_limit_ratio, redis} and the node's sums of its decisions:
--   allowed, near_limit, rejected, shadow_rejected, failed_open,
--   failed_closed;
-- * figures: every module's own figures as render() has them, a list of
--   {name, type, help, labels, value};
-- * jobs: the periodic jobs of the worker that answered (lifecycle.jobs()),
--   a list of {job, interval, runs, failures, overruns, deferred,
--   last_duration, last_error} (interval, last_duration and last_error
--   left out when there is none).
--
-- Keys are strings escaped as JSON needs, and <, > and & too; a key that
-- is not UTF-8 shows its bytes from 0x80 on as \xNN, as in render().
function _M.json(self)
    if getmetatable(self) ~= mt then
        dot_call("m", "json", 2)
    end
    publish(self)

    local doc = { time = ngx_now(), counters = array(), requests = array(),
                  values = array(), limits = array(), figures = array(),
                  jobs = array() }
    for i, job in ipairs(lifecycle.jobs()) do
        doc.jobs[i] = { job = job.name, interval = job.interval,
                        runs = job.runs, failures = job.failures,
                        overruns = job.overruns, deferred = job.deferred,
                        last_duration = job.last_duration,
                        last_error = job.last_error }
    end
    for _, entry in ipairs(self.entries) do
        local kind, obj = entry.kind, entry.obj
        local dict_name = obj.dict_name
        if kind == "counter" then
            local list = doc.counters
            list[#list + 1] = {
                dict = dict_name, metric = entry.mapping.family,
                keys = key_values(obj:get_keys(0), function(key)
                    local value = obj:get(key)
                    return type(value) == "number" and value or nil
                end),
            }
        elseif kind == "requests" then
            local list = doc.requests
            local text, err = obj:stats()
            if text then
                -- JSON already: <, > and & (only ever inside its
                -- strings) escaped as in the rest.
                text = gsub(text, "[<>&]", json_escape)
                text = gsub(text, "\226\128[\168\169]", json_escape)
                list[#list + 1] = { dict = dict_name,
                                    stats = setmetatable({ text }, RAW) }
            else
                list[#list + 1] = { dict = dict_name, error = tostring(err) }
            end
        elseif kind == "limit" then
            doc.limits[#doc.limits + 1] = limit_json(self, entry)
        elseif entry.values then
            local values = entry.shared:_values()
            if values then
                local keys = {}
                for key in pairs(values) do
                    keys[#keys + 1] = key
                end
                doc.values[#doc.values + 1] = {
                    kind = kind, dict = dict_name, name = entry.shared.name,
                    keys = key_values(keys, function(key)
                        return values[key]
                    end),
                }
            end
        end
    end

    local figures = doc.figures
    each_figure(self, function(f, names, values, value)
        local labels = {}
        for _, name in ipairs(names) do
            labels[name] = values[name]
        end
        figures[#figures + 1] = { name = f.family, type = f.type,
                                  help = f.help, labels = labels,
                                  value = value }
    end)
    return json_text(doc)
end


local PAGE_OPTIONS = { json_url = true, refresh = true, title = true }


-- syntax: html = m:status_page(opts?)
--
-- context: any phase; meant for content_by_lua*
--
-- A self-contained HTML page (inline CSS and script, nothing else to
-- load; serve it with Content-Type `metrics.status_content_type`) that
-- shows what m:json() gives and reads it again every opts.refresh seconds
-- (default 5) from opts.json_url (default "status.json", relative to the
-- page: at /status, /status.json; on the page's own host). opts.title
-- (default "resty.counter status") heads the page. The page writes keys as
-- text only, never as markup. An unknown option raises.
function _M.status_page(self, opts)
    if getmetatable(self) ~= mt then
        dot_call("m", "status_page", 2)
    end
    opts = check.table(opts, "opts", 2)
    check.options(opts, PAGE_OPTIONS, "opts", 2)
    return status.page(
        check.text(opts.json_url, "opts.json_url", 2, "status.json"),
        check.seconds(opts.refresh, "opts.refresh", 2, 5),
        check.text(opts.title, "opts.title", 2, "resty.counter status"))
end


return _M
