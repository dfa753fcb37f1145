-- Moves every job of a worker's in-flight list back to the head of its queue (the right end, where workers
-- take from), newest first so that the oldest is taken next (worker/inflight.py restore).
-- KEYS[1]  the in-flight list (rerankq:inflight:<worker>:<queue>)
-- KEYS[2]  the queue's list
-- Returns how many jobs went back.
local moved = 0
while redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT') do moved = moved + 1 end
return moved
