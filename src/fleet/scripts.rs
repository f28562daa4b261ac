//! The fill lock's scripts and the calls that run them: taking the lock with the first look
//! (`LOOKUP`) or alone (`TAKE`), extending its lease (`EXTEND`), and ending it — a token-checked
//! store that also releases and publishes `stored` (`STORE`), or a token-checked release that
//! publishes why nothing was stored (`RELEASE`). Each runs a key's decision in one round trip,
//! touching only that key's entry, lock and marker (one Cluster slot). The notices they publish
//! are handed to them by [`Notice`]; none is spelled here.

use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use redis::Script;

use super::notice::{MAX_NOTICE_ENTRY, Notice};
use super::{Lookup, StoreOutcome};
use crate::entry::{Entry, now_ms};
use crate::l2::{KeyNames, L2, L2Error, PURGED_LOCK, decode, millis};
use crate::trace::FillRef;

/// Writes the entry only while the caller still holds the lock (or nobody holds it and no entry
/// exists), so a leader that lost its lock can never overwrite a newer fill; then releases the lock
/// and publishes the notice — ARGV[8], the `stored` notice's prefix ([`Notice::stored_prefix`]),
/// followed by the entry itself when ARGV[5] is 1, so waiters need no read — all in one round
/// trip. A lock a purge marked (ARGV[6]) is released with the notice ARGV[9] (`failed`) and
/// nothing is written. ARGV[7] is the publishing command: `SPUBLISH` in a cluster, else `PUBLISH`.
///
/// KEYS[3..] are the entry's tag indexes (none in a cluster, where they live in other slots):
/// each gets the entry's name, and lives at least as long as the entry, exactly when the entry is
/// written — so a stored entry is never unindexed, and a refused store indexes nothing.
const STORE: &str = r"
local notice = ARGV[8]
if ARGV[5] == '1' then notice = notice .. ARGV[2] end
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
  redis.call(ARGV[7], ARGV[4], ARGV[9])
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
const LOOKUP: &str = r"
local entry = redis.call('GET', KEYS[1])
if entry then return {entry, 0} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {false, 1} end
if redis.call('SET', KEYS[3], ARGV[1], 'NX', 'PX', ARGV[2]) then return {false, 2} end
if redis.call('GET', KEYS[3]) == ARGV[1] then return {false, 2} end
return {false, 3}
";

/// `SET NX PX` that also answers yes when the caller's token already holds the lock, so a
/// retry after a dropped connection cannot mistake our own lock for another's.
const TAKE: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then return 1 end
return 0
";

/// Compare-and-delete of a lock, publishing a notice when there is one to give, and setting the
/// uncacheable marker when asked to (ARGV[4] > 0 milliseconds). ARGV[5] is the publishing
/// command: `SPUBLISH` in a cluster, else `PUBLISH`.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  if tonumber(ARGV[4]) > 0 then redis.call('SET', KEYS[2], '1', 'PX', ARGV[4]) end
  if ARGV[3] ~= '' then redis.call(ARGV[5], ARGV[2], ARGV[3]) end
  return 1
end
return 0
";

/// Extends a lease only for its holder.
const EXTEND: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// The scripts, made once per process.
struct Scripts {
    lookup: Script,
    take: Script,
    store: Script,
    release: Script,
    extend: Script,
}

fn scripts() -> &'static Scripts {
    static SCRIPTS: OnceLock<Scripts> = OnceLock::new();
    SCRIPTS.get_or_init(|| Scripts {
        lookup: Script::new(LOOKUP),
        take: Script::new(TAKE),
        store: Script::new(STORE),
        release: Script::new(RELEASE),
        extend: Script::new(EXTEND),
    })
}

/// Every script a flight may run, to load when a connection warms up.
pub(super) fn all() -> [&'static Script; 5] {
    let s = scripts();
    [&s.lookup, &s.take, &s.store, &s.release, &s.extend]
}

/// The entry, or else the uncacheable marker, or else the fill lock under `token`; see
/// [`Lookup`] (whose permit is the caller's to make).
pub(super) async fn lookup(
    l2: &L2,
    names: &KeyNames,
    token: &str,
    lease: Duration,
    budget: Duration,
) -> Result<Lookup<()>, L2Error> {
    let mut call = scripts().lookup.key(&names.entry);
    call.key(&names.pass)
        .key(&names.lock)
        .arg(token)
        .arg(millis(lease));
    let (raw, state): (Option<Bytes>, i64) = l2.invoke("lookup", budget, &call).await?;
    Ok(match (raw, state) {
        (Some(raw), _) => decode(&names.entry, raw).map_or(Lookup::Garbled, Lookup::Entry),
        (None, 1) => Lookup::Uncacheable,
        (None, 2) => Lookup::Locked(()),
        (None, _) => Lookup::Held,
    })
}

/// `SET lock token NX PX lease` (see `TAKE`): whether the caller now holds the fill lock.
pub(super) async fn take(
    l2: &L2,
    names: &KeyNames,
    token: &str,
    lease: Duration,
    budget: Duration,
) -> Result<bool, L2Error> {
    on_lock(
        l2,
        "take lock",
        &scripts().take,
        names,
        token,
        lease,
        budget,
    )
    .await
}

/// Extends the lease if `token` still holds the lock; `false` when the lock was lost.
pub(super) async fn extend(
    l2: &L2,
    names: &KeyNames,
    token: &str,
    lease: Duration,
    budget: Duration,
) -> Result<bool, L2Error> {
    on_lock(l2, "extend", &scripts().extend, names, token, lease, budget).await
}

/// Runs `script` on the lock with `token` and `lease`; whether it did what it is for (`1`).
async fn on_lock(
    l2: &L2,
    op: &'static str,
    script: &Script,
    names: &KeyNames,
    token: &str,
    lease: Duration,
    budget: Duration,
) -> Result<bool, L2Error> {
    let mut call = script.key(&names.lock);
    call.arg(token).arg(millis(lease));
    let n: i64 = l2.invoke(op, budget, &call).await?;
    Ok(n == 1)
}

/// Releases the lock if `token` holds it, publishing `notice` (if any) to the waiters and, for
/// an uncacheable answer, setting the marker for `pass_ttl`.
///
/// Owed to the waiters (see [`L2::owed`]): not refused by an open circuit. Bounded by `budget`.
pub(super) async fn release(
    l2: &L2,
    names: &KeyNames,
    token: &str,
    notice: Option<&Notice>,
    pass_ttl: Duration,
    budget: Duration,
) -> Result<bool, L2Error> {
    let mut call = scripts().release.key(&names.lock);
    let pass_ms = if matches!(notice, Some(Notice::Uncacheable)) {
        u64::try_from(pass_ttl.as_millis()).unwrap_or(u64::MAX)
    } else {
        0
    };
    call.key(&names.pass)
        .arg(token)
        .arg(&names.channel)
        .arg(notice.map(Notice::payload).unwrap_or_default().as_ref())
        .arg(pass_ms)
        .arg(l2.publish_command());
    let n: i64 = l2.owed("release", budget, &call).await?;
    Ok(n == 1)
}

/// Token-checked write of a filled entry; see [`StoreOutcome`]. `by`: the fill's span, when one
/// is recorded (waiters elsewhere link to it). Indexes its tags too, in the same round trip:
/// inside the script outside a cluster (only when the entry is written); in a cluster, where the
/// indexes live in other slots, by pipelines sent beside the script (a store that is then refused
/// leaves index members behind: a purge by that tag deletes the key's next entry too, at most one
/// extra miss).
pub(super) async fn store(
    l2: &L2,
    names: &KeyNames,
    token: &str,
    entry: &Entry,
    by: Option<&FillRef>,
    budget: Duration,
) -> Result<StoreOutcome, L2Error> {
    let Some(ttl) = entry.times.remaining(now_ms()) else {
        return Ok(StoreOutcome::Superseded);
    };
    let encoded = entry.encode();
    let with_entry = encoded.len() <= MAX_NOTICE_ENTRY;
    let mut call = scripts().store.key(&names.entry);
    call.key(&names.lock);
    let apart = l2.spans_slots();
    if !apart {
        for tag in &entry.tags {
            call.key(l2.tag_index(tag));
        }
    }
    call.arg(token)
        .arg(encoded.as_ref())
        .arg(millis(ttl))
        .arg(&names.channel)
        .arg(if with_entry { "1" } else { "0" })
        .arg(PURGED_LOCK)
        .arg(l2.publish_command())
        .arg(Notice::stored_prefix(by, with_entry).as_ref())
        .arg(Notice::Failed(None).payload().as_ref());
    let store = l2.invoke("store", budget, &call);
    let n: i64 = if apart {
        tokio::join!(store, l2.index_tags(names, entry)).0?
    } else {
        store.await?
    };
    Ok(match n {
        1 => StoreOutcome::Stored,
        2 => StoreOutcome::StoredUnlocked,
        3 => StoreOutcome::Purged,
        _ => StoreOutcome::Superseded,
    })
}
