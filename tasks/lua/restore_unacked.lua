-- Puts one unacked job back at the head of its queue, only if its record is of a delivery in the given window
-- and unchanged since read (tasks/connections.py restore_unacked: put-backs, a closing channel, the reclaim).
-- KEYS[1]  kombu's unacked index (sorted set: delivery tag -> time recorded)
-- KEYS[2]  kombu's unacked hash (delivery tag -> [message, exchange, routing key])
-- KEYS[3..] the queue lists to push the job to (kombu's restore)
-- ARGV[1]  the delivery tag
-- ARGV[2]  its record as read
-- ARGV[3], ARGV[4]  the window its delivery time must be in: from, before
-- ARGV[5..] the values to push, one per KEYS[3..]
-- Returns 1 if it was put back.
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then return 0 end
local delivered = tonumber(score)
if delivered < tonumber(ARGV[3]) or delivered >= tonumber(ARGV[4]) then return 0 end
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
for i = 3, #KEYS do redis.call('RPUSH', KEYS[i], ARGV[i + 2]) end
return 1
