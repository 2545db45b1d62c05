"""A first-come-first-served wait queue in Redis, so no waiter starves.

Only the waiter at the head of an entity's queue may try the lock; newcomers queue
behind it. Each waiter keeps a heartbeat key alive while it waits; a head whose
heartbeat expired (its sidecar died or is paused) is dropped. The queue decides who
*tries*, never who *holds*: mutual exclusion stays with Redlock (and order with the
broker's fencing check), so the queue lives on one master, and when that master is
unreachable waiters simply try in any order.
"""

from __future__ import annotations

from redis.asyncio import Redis

HEARTBEAT_MS = 2000

# KEYS: queue zset, ticket counter, my heartbeat key. ARGV: me, heartbeat ms, heartbeat
# key prefix, join. Without join: 1 when nobody waits. With join: queue up (once, with
# the next ticket), keep the heartbeat alive, and 1 when at the head.
_TURN = """
local queue, counter, beat = KEYS[1], KEYS[2], KEYS[3]
local me, ms, prefix, join = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4] == '1'
if join then
  redis.call('SET', beat, '1', 'PX', ms)
  if not redis.call('ZSCORE', queue, me) then
    redis.call('ZADD', queue, redis.call('INCR', counter), me)
  end
  redis.call('PEXPIRE', queue, ms * 10)
  redis.call('PEXPIRE', counter, ms * 10)
end
while true do
  local head = redis.call('ZRANGE', queue, 0, 0)[1]
  if not head then return 1 end
  if head == me then return 1 end
  if redis.call('EXISTS', prefix .. head) == 1 then return 0 end
  redis.call('ZREM', queue, head)
end
"""

_LEAVE = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
return 1
"""


class FairQueue:
    """Wait queues on one Redis master, one per lock key."""

    def __init__(self, master: Redis) -> None:
        self._master = master
        self._turn = master.register_script(_TURN)
        self._leave = master.register_script(_LEAVE)

    @staticmethod
    def _keys(key: str) -> tuple[str, str, str]:
        return (
            f"ordersidecar:queue:{key}",
            f"ordersidecar:ticket:{key}",
            f"ordersidecar:waiter:{key}:",
        )

    async def my_turn(self, key: str, waiter: str, *, join: bool) -> bool:
        """Whether *waiter* may try the lock now.

        Without ``join`` (a first try): only when nobody waits. With ``join``: *waiter*
        takes (or keeps) its place in the queue, and may try once it is at the head.
        """
        queue, counter, prefix = self._keys(key)
        result = await self._turn(
            keys=[queue, counter, prefix + waiter],
            args=[waiter, HEARTBEAT_MS, prefix, "1" if join else "0"],
        )
        return bool(result)

    async def leave(self, key: str, waiter: str) -> None:
        """Take *waiter* out of the queue."""
        queue, _, prefix = self._keys(key)
        await self._leave(keys=[queue, prefix + waiter], args=[waiter])
