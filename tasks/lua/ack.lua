-- Acks many jobs in one round trip, each removing its own delivery's record only: a job put back and received
-- again has a new record under the same delivery tag (worker/upstream/acks.py ack_in_redis).
-- KEYS[1]  kombu's unacked index (sorted set: delivery tag -> time recorded)
-- KEYS[2]  kombu's unacked hash (delivery tag -> [message, exchange, routing key])
-- ARGV     per job three: its delivery tag, then the window its record's time must be in (from, before);
--          '' '' for any record of the tag, a delivery whose time is not known
for i = 1, #ARGV, 3 do
  local tag, from = ARGV[i], ARGV[i + 1]
  local own = from == ''
  if not own then
    local score = redis.call('ZSCORE', KEYS[1], tag)
    own = score and tonumber(score) >= tonumber(from) and tonumber(score) < tonumber(ARGV[i + 2])
  end
  if own then
    redis.call('ZREM', KEYS[1], tag)
    redis.call('HDEL', KEYS[2], tag)
  end
end
return 0
