//! The Lua scripts Redis runs for rate-limit decisions.
//!
//! Each decision is one `EVALSHA` (the redis crate falls back to loading the
//! script when Redis answers `NOSCRIPT`, after a restart or `SCRIPT FLUSH`),
//! so a decision is one atomic round trip. Both scripts check every limit
//! first and write only when all of them admit the request, read the time
//! from Redis (`TIME`, or key TTLs) so that pods with drifting clocks agree,
//! and give every key they write a TTL in the same call.
//!
//! Both return `{allowed (0|1), retry after ms, remaining_1, reset ms_1, …}`,
//! one pair per key, in key order.

/// GCRA (the generic cell rate algorithm) over several limits at once.
///
/// KEYS[i]: the counter of limit i; every key in one hash-tag slot.
/// ARGV[1]: the request's cost.
/// ARGV[2i]: limit i's emission interval in µs (window / requests).
/// ARGV[2i+1]: limit i's burst (requests admitted at once).
///
/// A counter holds its limit's theoretical arrival time (TAT) in µs of Redis
/// time, and expires when the TAT passes, so an idle client leaves nothing.
/// A refused request writes nothing. `retry after` is the longest wait among
/// the limits that refused; `reset` is when a limit is full again.
pub const GCRA: &str = r"
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000000 + tonumber(now_parts[2])
local cost = tonumber(ARGV[1])

local tats = {}
local allowed = 1
local retry = 0
for i = 1, #KEYS do
  local interval = tonumber(ARGV[2 * i])
  local burst = tonumber(ARGV[2 * i + 1])
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  if tat < now then
    tat = now
  end

  local new_tat = tat + cost * interval
  local allow_at = new_tat - burst * interval
  if allow_at > now then
    allowed = 0
    if allow_at - now > retry then
      retry = allow_at - now
    end
  end
  tats[i] = {tat, new_tat}
end

local result = {allowed, math.ceil(retry / 1000)}
for i = 1, #KEYS do
  local interval = tonumber(ARGV[2 * i])
  local burst = tonumber(ARGV[2 * i + 1])
  local tat = tats[i][1]
  if allowed == 1 then
    tat = tats[i][2]
    local ttl_ms = math.max(1, math.ceil((tat - now) / 1000))
    redis.call('SET', KEYS[i], string.format('%.0f', tat), 'PX', ttl_ms)
  end

  local remaining = math.floor((now + burst * interval - tat) / interval)
  if remaining < 0 then
    remaining = 0
  end
  table.insert(result, remaining)
  table.insert(result, math.ceil((tat - now) / 1000))
end
return result
";

/// Fixed windows over several limits at once; each window starts at the
/// client's first request in it.
///
/// KEYS[i]: the counter of limit i; every key in one hash-tag slot.
/// ARGV[1]: the request's cost.
/// ARGV[2i]: limit i's requests per window.
/// ARGV[2i+1]: limit i's window in ms.
///
/// A counter holds the requests counted in its window and expires with the
/// window (Redis's clock runs the TTL). A refused request consumes nothing;
/// a counter found without a TTL gets one, so no key outlives its window.
pub const FIXED_WINDOW: &str = r"
local cost = tonumber(ARGV[1])

local counts = {}
local ttls = {}
local allowed = 1
local retry = 0
for i = 1, #KEYS do
  local limit = tonumber(ARGV[2 * i])
  local window = tonumber(ARGV[2 * i + 1])
  local count = tonumber(redis.call('GET', KEYS[i]) or '0')
  local ttl = redis.call('PTTL', KEYS[i])
  if ttl < 0 then
    if count > 0 then
      redis.call('PEXPIRE', KEYS[i], window)
    end
    ttl = window
  end

  if count + cost > limit then
    allowed = 0
    if ttl > retry then
      retry = ttl
    end
  end
  counts[i] = count
  ttls[i] = ttl
end

local result = {allowed, retry}
for i = 1, #KEYS do
  local limit = tonumber(ARGV[2 * i])
  local window = tonumber(ARGV[2 * i + 1])
  local count = counts[i]
  if allowed == 1 then
    count = redis.call('INCRBY', KEYS[i], cost)
    if redis.call('PTTL', KEYS[i]) < 0 then
      redis.call('PEXPIRE', KEYS[i], window)
    end
  end

  local remaining = limit - count
  if remaining < 0 then
    remaining = 0
  end
  table.insert(result, remaining)
  table.insert(result, ttls[i])
end
return result
";
