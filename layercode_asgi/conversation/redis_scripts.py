"""The Lua scripts of :class:`~layercode_asgi.conversation.RedisConversationStore`, and the
keys of a conversation they take (:class:`Keys`).

Every script touches the keys of one conversation only; they share one hash tag, so in a
Redis Cluster each script runs on the one node that owns the conversation.

The lock is a fair queue. Keys (all of one conversation):

* ``lock``: the holder's token, with a TTL (``lock_ttl``) that the holder keeps extending;
* ``queue``: a list of waiters in arrival order, each entry ``"<token> <channel>"``;
* ``<presence prefix><token>``: one per waiter, with a short TTL that the waiter keeps
  extending while it waits; a waiter whose worker died stops extending it.

Whoever frees the lock (the holder releasing it, a waiter giving up while it was being
handed the lock, or anyone finding it free with waiters queued: the holder crashed)
*hands it off*: pops entries until one whose presence key still exists, sets the lock to
that waiter's token (TTL: the presence TTL, enough to claim it) and ``PUBLISH``-es the token
on the waiter's channel, which wakes it. The woken waiter claims the lock (full TTL) and
reads the history in the same script. Abandoned entries are skipped, never waited for.

Lock scripts take ``KEYS = [lock, queue, history, generation]`` and
``ARGV = [token, entry, lock_ttl_ms, presence_prefix, presence_ttl_ms, generation_ttl_s]``;
they return ``{1, history entries, generation}`` when the caller holds the lock, else
``{0}``.
"""

from __future__ import annotations

import hashlib
from typing import Final

from .base import check_conversation_id

__all__ = [
    "ACQUIRE_LUA",
    "CHECK_LUA",
    "CLEAR_LUA",
    "EXTEND_LUA",
    "PROBE_LUA",
    "READ_LUA",
    "RECORD_LUA",
    "RELEASE_LUA",
    "Keys",
]


class Keys:
    """The keys of one conversation; one hash tag, so one Redis Cluster slot.

    The tag is the id itself, or for an id with a brace (which would end the tag) ``#`` and
    its hash, the id following in full: two conversations never share keys.
    """

    __slots__ = ("generation", "history", "lock", "presence", "queue")

    def __init__(self, prefix: str, conversation_id: str) -> None:
        check_conversation_id(conversation_id)
        if "{" in conversation_id or "}" in conversation_id:
            digest = hashlib.sha256(conversation_id.encode("utf-8", "surrogatepass")).hexdigest()
            base = f"{prefix}{{#{digest[:32]}}}:{conversation_id}:"
        else:
            base = f"{prefix}{{{conversation_id}}}:"
        self.history = base + "history"
        self.generation = base + "generation"
        self.lock = base + "lock"
        self.queue = base + "queue"
        self.presence = base + "waiter:"


# handoff(queue, lock, presence prefix, presence ttl): the lock is free; give it to the
# first waiter still present. Returns its token, or false when no waiter is left.
_HANDOFF: Final = """
local function handoff(queue, lock, presence, ttl)
    while true do
        local entry = redis.call('lpop', queue)
        if not entry then
            return false
        end
        local space = string.find(entry, ' ', 1, true)
        local token = string.sub(entry, 1, space - 1)
        if redis.call('exists', presence .. token) == 1 then
            redis.call('set', lock, token, 'px', ttl)
            redis.call('publish', string.sub(entry, space + 1), token)
            return token
        end
    end
end
"""

_HOLDING: Final = """
local function holding()
    redis.call('set', KEYS[1], ARGV[1], 'px', ARGV[3])
    redis.call('del', ARGV[4] .. ARGV[1])
    redis.call('expire', KEYS[4], ARGV[6])  -- outlives the turn that reads it (if it exists)
    return {1, redis.call('lrange', KEYS[3], 0, -1), redis.call('get', KEYS[4]) or '0'}
end
local function queued()
    redis.call('set', ARGV[4] .. ARGV[1], '1', 'px', ARGV[5])
    redis.call('pexpire', KEYS[2], ARGV[5])
    return {0}
end
"""

#: Lock + read: take the free lock (handing it first to any waiter still queued), or queue.
ACQUIRE_LUA: Final = (
    _HANDOFF
    + _HOLDING
    + """
if redis.call('exists', KEYS[1]) == 0 then
    if redis.call('llen', KEYS[2]) == 0
        or not handoff(KEYS[2], KEYS[1], ARGV[4], ARGV[5]) then
        return holding()
    end
end
redis.call('rpush', KEYS[2], ARGV[2])
return queued()
"""
)

#: A waiter woken (or checking now and then): claim the lock handed to it, take it if free
#: (after handing it to any waiter ahead), else stay queued (again at the front if its
#: entry was popped) and present.
CHECK_LUA: Final = (
    _HANDOFF
    + _HOLDING
    + """
local holder = redis.call('get', KEYS[1])
if holder == ARGV[1] then
    return holding()
end
if not holder then
    local given = handoff(KEYS[2], KEYS[1], ARGV[4], ARGV[5])
    if not given or given == ARGV[1] then
        return holding()
    end
end
if not redis.call('lpos', KEYS[2], ARGV[2]) then
    redis.call('lpush', KEYS[2], ARGV[2])
end
return queued()
"""
)

#: Release the lock (if still ours) or leave the queue: KEYS = [lock, queue],
#: ARGV = [token, entry, presence prefix, presence ttl ms]. Hands the lock off if we held it.
RELEASE_LUA: Final = (
    _HANDOFF
    + """
redis.call('lrem', KEYS[2], 0, ARGV[2])
redis.call('del', ARGV[3] .. ARGV[1])
if redis.call('get', KEYS[1]) == ARGV[1] then
    redis.call('del', KEYS[1])
    handoff(KEYS[2], KEYS[1], ARGV[3], ARGV[4])
    return 1
end
return 0
"""
)

#: KEYS[1] = lock key, ARGV[1] = our token, ARGV[2] = new TTL in ms. Extend only if ours.
EXTEND_LUA: Final = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""

#: KEYS = [history, generation]: the history and the generation, read together;
#: ARGV[1] = the generation's TTL in s, renewed so that it outlives the turn reading it.
READ_LUA: Final = """
redis.call('expire', KEYS[2], ARGV[1])
return {redis.call('lrange', KEYS[1], 0, -1), redis.call('get', KEYS[2]) or '0'}
"""

# KEYS = [history, generation, lock, queue]. ARGV[1] = the generation the turn read ('' =
# append whatever it is), ARGV[2] = max messages, ARGV[3] = max bytes of text, ARGV[4] =
# TTL in s (0 = none), ARGV[5] = the lock token to release ('' = none), ARGV[6] = presence
# prefix, ARGV[7] = presence TTL in ms, ARGV[8..] = the entries. Appends only if the
# generation is current (or gone: Redis lost it, as a clear leaves it), drops the oldest
# entries beyond either bound, then releases the lock if ARGV[5] holds it; returns 1 if it
# appended. Texts are decoded only when the entries' total (>= the texts') is over the bound.
#: Record a turn and release its lock (one round trip at the end of a turn).
RECORD_LUA: Final = (
    _HANDOFF
    + """
local function record()
    local generation = redis.call('get', KEYS[2])
    if ARGV[1] ~= '' and generation and generation ~= ARGV[1] then
        return 0
    end
    for i = 8, #ARGV do
        redis.call('rpush', KEYS[1], ARGV[i])
    end
    redis.call('ltrim', KEYS[1], -tonumber(ARGV[2]), -1)
    local limit = tonumber(ARGV[3])
    local items = redis.call('lrange', KEYS[1], 0, -1)
    local total = 0
    for i = 1, #items do
        total = total + #items[i]
    end
    if total > limit then
        local sizes = {}
        total = 0
        for i = 1, #items do
            local ok, message = pcall(cjson.decode, items[i])
            local size = #items[i]
            if ok and type(message) == 'table' and type(message.text) == 'string' then
                size = #message.text
            end
            sizes[i] = size
            total = total + size
        end
        local drop = 0
        while total > limit and drop < #items - 1 do
            drop = drop + 1
            total = total - sizes[drop]
        end
        if drop > 0 then
            redis.call('ltrim', KEYS[1], drop, -1)
        end
    end
    if tonumber(ARGV[4]) > 0 then
        redis.call('expire', KEYS[1], ARGV[4])
    end
    return 1
end
local done = record()
if ARGV[5] ~= '' and redis.call('get', KEYS[3]) == ARGV[5] then
    redis.call('del', KEYS[3])
    handoff(KEYS[4], KEYS[3], ARGV[6], ARGV[7])
end
return done
"""
)

#: KEYS[1] = history, KEYS[2] = generation, ARGV[1] = the generation key's TTL in s.
CLEAR_LUA: Final = """
redis.call('del', KEYS[1])
redis.call('incr', KEYS[2])
redis.call('expire', KEYS[2], ARGV[1])
return 1
"""

#: ``/ready``'s check that Redis takes the store's writes (refused by a read-only replica,
#: a full Redis, MISCONF, an ACL user without EVALSHA, the keys or the channels).
#: KEYS[1] = a key of the store's (a second long), ARGV[1] = the store's channel.
PROBE_LUA: Final = """
redis.call('set', KEYS[1], '1', 'px', 1000)
redis.call('publish', ARGV[1], '')
return 1
"""
