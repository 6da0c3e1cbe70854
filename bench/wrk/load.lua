-- The load script bench/run.py gives wrk (`make bench`). One script for every window, set by environment:
--   BENCH_METHOD, BENCH_PATH     the request (wrk's own URL gives host and port)
--   BENCH_BODY                   the body (form-encoded); "@LINE@" in it stands for the thread's line
--   BENCH_HEADER                 one extra "Name: value" header (the bearer token of /verify), optional
--   BENCH_LINES                  a file with one line per wrk thread (each thread owns one connection): the
--                                thread's own user names (separated by spaces, used in turn), or its refresh token
--   BENCH_CHAIN                  "1": chain mode. Every 200 gives the refresh token the thread's next request
--                                sends in place of its line, so no token is ever used twice (rotation is on).
--   BENCH_STATUS                 the only status that counts as success (200; 204 for /verify)
--   BENCH_EXPECT                 a string the body must contain (`"active":true` for introspection), optional
-- done() prints one line, "BENCH_JSON {...}", with the counts and latency percentiles (microseconds).

local threads = {}
local count = 0

function setup(thread)
  count = count + 1
  thread:set("index", count)
  table.insert(threads, thread)
end

local function nth_line(path, n)
  local i = 0
  for line in io.lines(path) do
    i = i + 1
    if i == n then return line end
  end
  error("bench: no line " .. n .. " in " .. path)
end

function init(args)
  failures = 0
  method = os.getenv("BENCH_METHOD") or "GET"
  path = os.getenv("BENCH_PATH") or "/"
  body = os.getenv("BENCH_BODY")
  status_wanted = tonumber(os.getenv("BENCH_STATUS") or "200")
  expect = os.getenv("BENCH_EXPECT")
  local headers = {}
  if body then headers["Content-Type"] = "application/x-www-form-urlencoded" end
  local extra = os.getenv("BENCH_HEADER")
  if extra then
    local name, value = extra:match("^([^:]+):%s*(.*)$")
    headers[name] = value
  end
  chain = os.getenv("BENCH_CHAIN") == "1"
  local lines = os.getenv("BENCH_LINES")
  if lines then
    line = nth_line(lines, index)
    names = {}
    for name in line:gmatch("%S+") do table.insert(names, name) end
    turn = 0
  end
  template = body
  wanted_headers = headers
  if not lines then fixed = wrk.format(method, path, headers, body) end
end

function with_line(text)
  if text == nil or line == nil then return text end
  return (text:gsub("@LINE@", function() return line end))
end

function request()
  if fixed then return fixed end
  if not chain then
    turn = turn % #names + 1
    line = names[turn]
  end
  return wrk.format(method, path, wanted_headers, with_line(template))
end

function response(status, headers, text)
  if status ~= status_wanted then
    failures = failures + 1
    return
  end
  if expect and not text:find(expect, 1, true) then
    failures = failures + 1
    return
  end
  if chain then
    local next_token = text:match('"refresh_token"%s*:%s*"([^"]+)"')
    if next_token then line = next_token else failures = failures + 1 end
  end
end

function done(summary, latency, requests)
  local failed = 0
  for _, thread in ipairs(threads) do failed = failed + (thread:get("failures") or 0) end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "failures": %d, "connect_errors": %d, "read_errors": %d, ' ..
    '"write_errors": %d, "timeouts": %d, "non_2xx": %d, "p50_us": %.1f, "p90_us": %.1f, "p99_us": %.1f, ' ..
    '"mean_us": %.1f, "max_us": %.1f}\n',
    summary.requests, summary.duration, failed, e.connect, e.read, e.write, e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
