-- Runs commands in one atomic step (like a MULTI) that a full Redis 7+ still runs: only for commands that
-- move what Redis holds already (tasks/memory.py run_atomically).
-- KEYS     none: the commands name their keys (one Redis, never a cluster)
-- ARGV     the commands, each as its length then its words
local i = 1
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
return 0
