-- A worker's receive: moves up to ARGV[1] jobs in all from its lanes' queues to its in-flight lists, the
-- lanes in order (worker/upstream/transport.py). Between two receives a worker's in-flight lists are empty:
-- anything there was left by a receive that never completed (its answer lost with its connection, or a
-- command that timed out and ran late, once a hung Redis woke), and comes with this one.
-- KEYS[2i-1]  lane i's queue list
-- KEYS[2i]    the worker's in-flight list for lane i (rerankq:inflight:<worker>:<queue>)
-- ARGV[1]     how many jobs this receive may take in all
-- ARGV[1+i]   how many it may take from lane i
-- ARGV[#ARGV] how many of the newest items of lane 1's in-flight list this receive holds already (the job a
--             BLMOVE just moved): not returned again
-- Returns one list of items per lane: first what its in-flight list held already, then what moved.
local n = #KEYS / 2
local left = tonumber(ARGV[1])
local replies = {}
for i = 1, n do
  local items = redis.call('LRANGE', KEYS[2 * i], 0, -1)
  local moved = {}
  for j = #items, (i == 1 and tonumber(ARGV[#ARGV]) or 0) + 1, -1 do moved[#moved + 1] = items[j] end
  local cap = math.min(left, tonumber(ARGV[1 + i]))  -- leftovers count against what this receive may take
  while #moved < cap do
    local item = redis.call('LMOVE', KEYS[2 * i - 1], KEYS[2 * i], 'RIGHT', 'LEFT')
    if not item then break end
    moved[#moved + 1] = item
  end
  left = left - #moved
  replies[i] = moved
end
return replies
