-- wrk script: POST /v1/usage/events/batch, 100 events with fresh idempotency keys, for one of
-- the bench API keys (bench/results/keys.txt).
local keys = {}
local counter = 0
local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("tag", os.time() .. "-" .. threads)
end

function init(args)
  for line in io.lines("bench/results/keys.txt") do keys[#keys + 1] = line end
end

function request()
  counter = counter + 1
  local key = keys[(counter % #keys) + 1]
  local events = {}
  for i = 1, 100 do
    events[i] = string.format('{"idempotency_key": "%s-%d-%d", "meter": "generation"}', tag, counter, i)
  end
  local headers = { ["Authorization"] = "Bearer " .. key, ["Content-Type"] = "application/json" }
  return wrk.format("POST", nil, headers, '{"events": [' .. table.concat(events, ",") .. ']}')
end

function done(summary, latency, requests)
  io.write(string.format("non-2xx: %d\n", summary.errors.status))
end
