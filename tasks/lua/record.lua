-- kombu's unacked record of each job a receive moved, and its removal from the worker's in-flight list, in one
-- step; an item that is not a kombu message is only removed (worker/upstream/transport.py Channel._record). A
-- job no longer in the in-flight list was put back by a worker that took this one for dead: not recorded.
-- KEYS[1]  kombu's unacked index (sorted set: delivery tag -> time recorded)
-- KEYS[2]  kombu's unacked hash (delivery tag -> [message, exchange, routing key])
-- ARGV[1]  the time, the record's score
-- ARGV[2..] per moved item four: its in-flight list (rerankq:inflight:<worker>:<queue>), the item as moved,
--          its delivery tag ('' to drop it), kombu's record
-- Returns the tags recorded.
local recorded = {}
for i = 2, #ARGV, 4 do
  local key, raw, tag = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if redis.call('LREM', key, 1, raw) == 1 and tag ~= '' then
    redis.call('ZADD', KEYS[1], ARGV[1], tag)
    redis.call('HSET', KEYS[2], tag, ARGV[i + 3])
    recorded[#recorded + 1] = tag
  end
end
return recorded
