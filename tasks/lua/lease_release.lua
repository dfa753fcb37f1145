-- Gives the watchdogs' lease up if it is ours: a graceful stop hands over at once (worker/lease.py).
-- KEYS[1]  the lease (rerankq:lease:<name>)
-- ARGV[1]  who asks
-- Returns 1 if it was ours and is gone.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
