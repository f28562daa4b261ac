//! The Lua scripts of L2: each runs a key's decision (look, take, store, release, extend) in one
//! round trip, touching only that key's entry, lock and marker (one Cluster slot) — and, outside
//! a cluster, the store also the entry's tag indexes.

/// Writes the entry only while the caller still holds the lock (or nobody holds it and no entry
/// exists), so a leader that lost its lock can never overwrite a newer fill; then releases the lock
/// and publishes the notice — carrying the entry itself when ARGV[5] is 1, so waiters need no read
/// — all in one round trip. A lock a purge marked is released with a `failed` notice and nothing
/// is written. ARGV[7] is the publishing command: `SPUBLISH` in a cluster, else `PUBLISH`.
/// ARGV[8] is the fill's trace reference or empty (see [`crate::trace::FillRef::encode`]): it goes
/// between `stored:` and the entry, where a parser that does not know it finds no entry and reads
/// L2 instead.
///
/// KEYS[3..] are the entry's tag indexes (none in a cluster, where they live in other slots):
/// each gets the entry's name, and lives at least as long as the entry, exactly when the entry is
/// written — so a stored entry is never unindexed, and a refused store indexes nothing.
pub(super) const STORE: &str = r"
local notice = 'stored'
if ARGV[5] == '1' then notice = 'stored:' .. ARGV[8] .. ARGV[2]
elseif ARGV[8] ~= '' then notice = 'stored:' .. ARGV[8] end
local function index()
  for i = 3, #KEYS do
    redis.call('SADD', KEYS[i], KEYS[1])
    redis.call('PEXPIRE', KEYS[i], ARGV[3], 'NX')
    redis.call('PEXPIRE', KEYS[i], ARGV[3], 'GT')
  end
end
local holder = redis.call('GET', KEYS[2])
if holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  index()
  redis.call('DEL', KEYS[2])
  redis.call(ARGV[7], ARGV[4], notice)
  return 1
elseif holder == ARGV[6] then
  redis.call('DEL', KEYS[2])
  redis.call(ARGV[7], ARGV[4], 'failed')
  return 3
elseif not holder then
  if redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3], 'NX') then
    index()
    redis.call(ARGV[7], ARGV[4], notice)
    return 2
  end
end
return 0
";

/// A flight's first look at a key: the entry if there is one; else the uncacheable marker; else
/// the fill lock, taken if free (`SET NX PX`) — one round trip where GET, then SET NX, then a
/// re-read under the lock took three.
///
/// Idempotent: run again with the same token (a retry after a dropped connection), it answers
/// `Locked` again rather than `Held` by ourselves.
pub(super) const LOOKUP: &str = r"
local entry = redis.call('GET', KEYS[1])
if entry then return {entry, 0} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {false, 1} end
if redis.call('SET', KEYS[3], ARGV[1], 'NX', 'PX', ARGV[2]) then return {false, 2} end
if redis.call('GET', KEYS[3]) == ARGV[1] then return {false, 2} end
return {false, 3}
";

/// `SET NX PX` that also answers yes when the caller's token already holds the lock, so a
/// retry after a dropped connection cannot mistake our own lock for another's.
pub(super) const TAKE: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then return 1 end
return 0
";

/// Compare-and-delete of a lock, publishing a notice when there is one to give, and setting the
/// uncacheable marker when asked to (ARGV[4] > 0 milliseconds). ARGV[5] is the publishing
/// command: `SPUBLISH` in a cluster, else `PUBLISH`.
pub(super) const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  if tonumber(ARGV[4]) > 0 then redis.call('SET', KEYS[2], '1', 'PX', ARGV[4]) end
  if ARGV[3] ~= '' then redis.call(ARGV[5], ARGV[2], ARGV[3]) end
  return 1
end
return 0
";

/// Extends a lease only for its holder.
pub(super) const EXTEND: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";
