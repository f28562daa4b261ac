//! The Redis side of a fleet-wide budget (see [`crate::budget`]): the slots in use, the queue of
//! calls waiting for one, and the instances that use the budget — each a key under the budget's
//! hash tag, so a Cluster keeps them on one slot and every decision is one script.
//!
//! - `held`: a sorted set of slot tokens scored by the moment their lease runs out. A token
//!   whose lease ran out (its instance died, or stopped renewing) is reclaimed by the next
//!   script that runs, so a dead instance's slots come back within a lease.
//! - `queue`: the tokens waiting, scored by arrival minus their boost (the requests they would
//!   answer): the lowest score is served first. `queued` holds each waiting token's own lease
//!   (three slot leases, renewed every lease). A call keeps its first arrival (Redis
//!   gave it on its first ask) and gives it with every renewal, so a place that lapsed while its
//!   instance was too busy to renew it comes back where it was, not at the end.
//! - `seen`: the instances that used the budget recently, for the share each falls back to
//!   when Redis cannot be reached.
//!
//! A freed slot is handed to the queue's head in the same script that frees it, and the grant is
//! published on the budget's channel ([`GRANTED`] and the token, ARGV[6]): the waiting instance
//! learns it without asking.

use std::time::Duration;

use redis::Script;

use super::notice::GRANTED;
use crate::l2::{L2, L2Error, millis};

/// The keys and channel of one budget.
#[derive(Debug, Clone)]
pub struct SlotNames {
    held: String,
    queue: String,
    queued: String,
    seen: String,
    /// Where grants are published.
    pub channel: String,
}

/// What a request for a slot found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotState {
    /// The caller holds a slot now.
    pub granted: bool,
    /// Slots whose lease had run out, taken back by this call.
    pub reclaimed: u64,
    /// Slots in use fleet-wide after the call.
    pub in_flight: u64,
    /// Calls waiting fleet-wide after the call.
    pub queued: u64,
    /// Instances that used the budget within the last [`SEEN_FOR`].
    pub instances: u64,
    /// When the caller first asked, in Redis's milliseconds: given back with every renewal.
    pub arrived: u64,
}

/// How long an instance counts as one of the budget's users after it last asked or renewed.
pub const SEEN_FOR: Duration = Duration::from_secs(30);

/// Time, reclaiming, and handing freed slots to the queue's head: shared by every script.
/// KEYS: held, queue, queued. ARGV[1] token, ARGV[2] limit, ARGV[3] lease ms,
/// ARGV[4] channel, ARGV[5] publishing command, ARGV[6] the grant's prefix. Leaves `now`, `reclaimed` and `free` defined.
macro_rules! prelude {
    () => {
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[3])
local reclaimed = redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)) do
  redis.call('ZREM', KEYS[2], gone)
  redis.call('ZREM', KEYS[3], gone)
end
local function hand_over(free)
  while free > 0 do
    local head = redis.call('ZPOPMIN', KEYS[2])
    if #head == 0 then break end
    redis.call('ZREM', KEYS[3], head[1])
    redis.call('ZADD', KEYS[1], now + lease, head[1])
    if head[1] ~= ARGV[1] then redis.call(ARGV[5], ARGV[4], ARGV[6] .. head[1]) end
    free = free - 1
  end
  return free
end
local function keep(ms)
  for i = 1, #KEYS do redis.call('PEXPIRE', KEYS[i], ms) end
end
"
    };
}

/// Asks for a slot, or renews a place in the queue. ARGV[7] is the caller's boost in ms (see
/// [`crate::budget::boost`]), ARGV[8] its instance, ARGV[9] how long it counts as seen, ARGV[10]
/// its first arrival (empty on its first ask); KEYS[4] is `seen`. Returns {granted, reclaimed,
/// in flight, queued, instances, arrival}.
const TAKE: &str = concat!(
    prelude!(),
    r"
redis.call('ZADD', KEYS[4], now + tonumber(ARGV[9]), ARGV[8])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
local free = hand_over(tonumber(ARGV[2]) - redis.call('ZCARD', KEYS[1]))
local granted = 0
local arrived = tonumber(ARGV[10]) or now
if redis.call('ZSCORE', KEYS[1], ARGV[1]) or free > 0 then
  redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
  granted = 1
else
  redis.call('ZADD', KEYS[2], arrived - tonumber(ARGV[7]), ARGV[1])
  redis.call('ZADD', KEYS[3], now + lease * 3, ARGV[1])
end
keep(lease * 12 + tonumber(ARGV[9]))
return {granted, reclaimed, redis.call('ZCARD', KEYS[1]), redis.call('ZCARD', KEYS[2]),
  redis.call('ZCARD', KEYS[4]), arrived}
"
);

/// Gives a slot back, or leaves the queue (whichever the token has), and hands what is free to
/// the queue's head. Returns {was held, reclaimed}.
const FREE: &str = concat!(
    prelude!(),
    r"
local held = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
hand_over(tonumber(ARGV[2]) - redis.call('ZCARD', KEYS[1]))
return {held, reclaimed}
"
);

/// Extends a held slot's lease, only while the token holds it; KEYS[2] is `seen`, ARGV[3] the
/// instance and ARGV[4] how long it counts as seen.
const EXTEND: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[3])
local keep = tonumber(ARGV[2]) * 12 + tonumber(ARGV[4])
redis.call('PEXPIRE', KEYS[1], keep)
redis.call('PEXPIRE', KEYS[2], keep)
return 1
";

/// The scripts, made once per process.
struct SlotScripts {
    take: Script,
    free: Script,
    extend: Script,
}

fn scripts() -> &'static SlotScripts {
    static SCRIPTS: std::sync::OnceLock<SlotScripts> = std::sync::OnceLock::new();
    SCRIPTS.get_or_init(|| SlotScripts {
        take: Script::new(TAKE),
        free: Script::new(FREE),
        extend: Script::new(EXTEND),
    })
}

/// One call to a budget: who asks, for how long, under which limit.
#[derive(Debug, Clone, Copy)]
pub struct SlotTerms<'a> {
    pub token: &'a str,
    pub instance: &'a str,
    pub limit: usize,
    pub lease: Duration,
    /// Each Redis call's budget.
    pub budget: Duration,
}

impl SlotNames {
    /// The keys of budget `name` in `namespace`.
    pub fn new(namespace: &str, name: &str) -> SlotNames {
        let base = format!("corral:{namespace}:budget:{{{name}}}");
        SlotNames {
            held: format!("{base}:held"),
            queue: format!("{base}:queue"),
            queued: format!("{base}:queued"),
            seen: format!("{base}:seen"),
            channel: base,
        }
    }
}

/// The budgets' calls, on the connection of the thread that runs them (the lease keeper's, see
/// [`crate::fleet::Fleet::with_slots`]).
pub struct Slots {
    l2: L2,
}

impl Slots {
    pub(super) fn on(l2: L2) -> Slots {
        Slots { l2 }
    }

    /// Takes a slot if one is free and nobody queues before us; else queues (or renews our place
    /// with a new `boost`). See [`SlotState`].
    pub async fn take_slot(
        &self,
        names: &SlotNames,
        terms: SlotTerms<'_>,
        boost: Duration,
        arrived: Option<u64>,
    ) -> Result<SlotState, L2Error> {
        let mut call = scripts().take.key(&names.held);
        call.key(&names.queue).key(&names.queued).key(&names.seen);
        self.slot_args(&mut call, names, terms);
        call.arg(u64::try_from(boost.as_millis()).unwrap_or(u64::MAX))
            .arg(terms.instance)
            .arg(millis(SEEN_FOR))
            .arg(arrived.map(|a| a.to_string()).unwrap_or_default());
        let (granted, reclaimed, in_flight, queued, instances, arrived): (
            u8,
            u64,
            u64,
            u64,
            u64,
            u64,
        ) = self.l2.invoke("budget take", terms.budget, &call).await?;
        Ok(SlotState {
            granted: granted == 1,
            reclaimed,
            in_flight,
            queued,
            instances,
            arrived,
        })
    }

    /// Gives back the slot `terms.token` holds, or its place in the queue. Returns whether it
    /// held a slot, and how many lapsed slots the call reclaimed.
    ///
    /// Not refused by an open circuit: a slot held on needlessly keeps a call of the fleet out.
    pub async fn free_slot(
        &self,
        names: &SlotNames,
        terms: SlotTerms<'_>,
    ) -> Result<(bool, u64), L2Error> {
        let mut call = scripts().free.key(&names.held);
        call.key(&names.queue).key(&names.queued);
        self.slot_args(&mut call, names, terms);
        let (held, reclaimed): (u8, u64) = self.l2.owed("budget free", terms.budget, &call).await?;
        Ok((held == 1, reclaimed))
    }

    /// Extends a held slot's lease. `Ok(false)`: the slot was lost (its lease ran out and it was
    /// reclaimed).
    pub async fn extend_slot(
        &self,
        names: &SlotNames,
        terms: SlotTerms<'_>,
    ) -> Result<bool, L2Error> {
        let mut call = scripts().extend.key(&names.held);
        call.key(&names.seen)
            .arg(terms.token)
            .arg(millis(terms.lease))
            .arg(terms.instance)
            .arg(millis(SEEN_FOR));
        let held: u8 = self.l2.invoke("budget extend", terms.budget, &call).await?;
        Ok(held == 1)
    }

    /// How many instances other than the caller listen on a key's fill channel: those waiting
    /// for its fill. Known to one Redis server (and behind sentinels); a cluster's sharded
    /// channels are counted by node, so there it answers 0.
    pub async fn listeners(&self, channel: &str, budget: Duration) -> Result<u64, L2Error> {
        if self.l2.publish_command() != "PUBLISH" {
            return Ok(0);
        }
        let mut cmd = redis::cmd("PUBSUB");
        cmd.arg("NUMSUB").arg(channel);
        let (_, count): (String, u64) = self.l2.query("PUBSUB NUMSUB", budget, &cmd).await?;
        Ok(count)
    }

    fn slot_args(
        &self,
        call: &mut redis::ScriptInvocation<'_>,
        names: &SlotNames,
        terms: SlotTerms<'_>,
    ) {
        call.arg(terms.token)
            .arg(terms.limit)
            .arg(millis(terms.lease))
            .arg(&names.channel)
            .arg(self.l2.publish_command())
            .arg(GRANTED);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_place_outlives_two_missed_renewals_and_the_keys_outlive_both() {
        // A queued call renews every lease; its place lasts three, and the budget's keys four
        // times that after the last call (so an idle budget leaves nothing behind).
        assert!(TAKE.contains("now + lease * 3, ARGV[1]"));
        assert!(TAKE.contains("keep(lease * 12 + "));
        assert!(EXTEND.contains("* 12 + "));
    }
}
