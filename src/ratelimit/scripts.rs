//! The Lua scripts Redis runs for rate-limit decisions.
//!
//! Each decision is one `EVALSHA` (the redis crate falls back to `EVAL` when
//! Redis answers `NOSCRIPT`, for example after a restart), so a decision is
//! one atomic round trip.

/// Fixed window with the window starting at a client's first request.
///
/// KEYS[1]: the counter key.
/// ARGV[1]: cost of this request; ARGV[2]: limit; ARGV[3]: window in ms.
/// Returns `{allowed (0|1), count after the decision, ms until the window resets}`.
///
/// A refused request consumes nothing. The counter always gets a TTL in the
/// same script that creates it, so no key can outlive its window.
pub const FIXED_WINDOW: &str = r"
local cost = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local window = tonumber(ARGV[3])

local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local ttl = redis.call('PTTL', KEYS[1])

if current + cost > limit then
  if ttl < 0 then
    redis.call('PEXPIRE', KEYS[1], window)
    ttl = window
  end
  return {0, current, ttl}
end

local count = redis.call('INCRBY', KEYS[1], cost)
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], window)
  ttl = window
end
return {1, count, ttl}
";
