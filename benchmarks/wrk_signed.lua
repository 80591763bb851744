-- wrk script: POST pre-signed LayerCode `message` webhooks, a different conversation and
-- turn on every request, each with its own valid `layercode-signature`.
--
-- wrk's LuaJIT has no HMAC, so benchmarks/run.py signs the bodies just before each run
-- (timestamps are fresh; the servers' tolerance is 300 s, a run lasts seconds) and writes
-- one `<signature>\t<body>` line per request to a file passed after `--`:
--
--   wrk -t2 -c50 -d10s --latency -s benchmarks/wrk_signed.lua URL -- requests.tsv 2
--
-- (the last argument repeats the number of threads: a thread's Lua state cannot see it).
-- Thread i of n sends lines i, i+n, i+2n, ... in a loop, so no two threads share a
-- conversation. done() prints one JSON line (prefix "WRKJSON ") with exact numbers.

local counter = 0

function setup(thread)
   thread:set("id", counter)
   counter = counter + 1
end

local requests = {}
local index = 0

function init(args)
   local path = args[1]
   local nthreads = tonumber(args[2]) or 1
   local myid = id or 0
   local path_url = wrk.path
   local line_no = 0
   for line in io.lines(path) do
      if line_no % math.max(nthreads, 1) == myid then
         local sig, body = line:match("^([^\t]*)\t(.*)$")
         local headers = {}
         headers["Content-Type"] = "application/json"
         headers["layercode-signature"] = sig
         requests[#requests + 1] = wrk.format("POST", path_url, headers, body)
      end
      line_no = line_no + 1
   end
   if #requests == 0 then
      error("no requests read from " .. tostring(path))
   end
end

function request()
   index = index % #requests + 1
   return requests[index]
end

function done(summary, latency, requests_)
   local e = summary.errors
   io.write(string.format(
      'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
      '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"status_errors":%d,' ..
      '"timeout_errors":%d,"lat_mean_us":%.1f,"lat_p50_us":%d,"lat_p75_us":%d,' ..
      '"lat_p90_us":%d,"lat_p99_us":%d,"lat_max_us":%d}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.mean, latency:percentile(50), latency:percentile(75),
      latency:percentile(90), latency:percentile(99), latency.max))
end
