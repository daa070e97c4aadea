-- wrk script: each request uses one of the bench API keys (bench/results/keys.txt); POST
-- /v1/usage/events gets a fresh Idempotency-Key, POST /v1/usage/events/batch 100 fresh events.
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
  local headers = { ["Authorization"] = "Bearer " .. key, ["Content-Type"] = "application/json" }
  if wrk.path == "/v1/usage/events/batch" then
    local events = {}
    for i = 1, 100 do
      events[i] = string.format('{"idempotency_key": "%s-%d-%d", "meter": "generation"}', tag, counter, i)
    end
    return wrk.format("POST", nil, headers, '{"events": [' .. table.concat(events, ",") .. ']}')
  end
  if wrk.path == "/v1/usage/events" then
    headers["Idempotency-Key"] = tag .. "-" .. counter
    return wrk.format("POST", nil, headers, '{"meter": "generation"}')
  end
  return wrk.format("GET", nil, headers)
end

function done(summary, latency, requests)
  local non2xx = summary.errors.status
  io.write(string.format("non-2xx: %d\n", non2xx))
end
