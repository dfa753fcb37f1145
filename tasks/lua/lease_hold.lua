-- Takes the watchdogs' lease if it is free, renews it if it is ours (worker/lease.py Lease.hold).
-- KEYS[1]  the lease (rerankq:lease:<name>)
-- ARGV[1]  who asks: host, pid and a suffix
-- ARGV[2]  the lease's life, in milliseconds
-- Returns 1 if the caller holds the lease now.
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
