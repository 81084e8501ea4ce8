-- wrk's script for bench/signups.py: every request is a sign-up POST with an address of its own, made
-- by a browser that has loaded the form (a session cookie and the CSRF token that came with the page).
--
--   wrk ... -s bench/signups.lua http://127.0.0.1:PORT/ -- signup SESSIONS_FILE TAG
--   wrk ... -s bench/signups.lua http://127.0.0.1:PORT/ -- bare
--
-- SESSIONS_FILE has a line per browser, "cookie<TAB>token", fetched by bench/signups.py with a GET of
-- the form each before the run. An answer counts as accepted only if it is the page a sign-up gets
-- ("We have sent a confirmation link to ADDRESS"); the addresses accepted are written, one a line, to
-- the file named by SIGNUPS_ACCEPTED_FILE, so that the benchmark can check each one was stored and
-- mailed. done() prints one JSON line with wrk's figures.

local threads, next_id = {}, 1

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

function init(args)
  mode, sessions, sent, accepted, refused = args[1], {}, 0, {}, 0
  if mode == "signup" then
    tag = args[3]
    for line in io.lines(args[2]) do
      local cookie, token = line:match("^([^\t]+)\t(.+)$")
      table.insert(sessions, { cookie = cookie, token = token })
    end
  end
end

function request()
  sent = sent + 1
  if mode == "bare" then
    return wrk.format("GET", "/")
  end
  local session = sessions[sent % #sessions + 1]
  local address = string.format("load-%s-%d-%d%%40example.com", tag, id, sent)
  return wrk.format("POST", "/", {
    ["Content-Type"] = "application/x-www-form-urlencoded",
    ["Cookie"] = session.cookie,
  }, "csrf_token=" .. session.token .. "&email=" .. address .. "&website=")
end

function response(status, headers, body)
  if mode == "bare" then
    if status ~= 200 or body ~= "ok" then refused = refused + 1 else table.insert(accepted, "") end
    return
  end
  local address = status == 200 and body:match("sent a confirmation link to ([^%s<]+)%. ")
  if address then table.insert(accepted, address) else refused = refused + 1 end
end

function done(summary, latency, requests)
  local out = os.getenv("SIGNUPS_ACCEPTED_FILE")
  local file = out and io.open(out, "w")
  local accepted, refused = 0, 0
  for _, thread in ipairs(threads) do
    local addresses = thread:get("accepted")
    accepted = accepted + #addresses
    refused = refused + thread:get("refused")
    if file then
      for _, address in ipairs(addresses) do file:write(address, "\n") end
    end
  end
  if file then file:close() end
  local errors = summary.errors
  io.write(string.format(
    '{"requests": %d, "seconds": %.3f, "accepted": %d, "refused": %d, "connect": %d, "read": %d, ' ..
    '"write": %d, "status": %d, "timeout": %d, "p50_ms": %.2f, "p90_ms": %.2f, "p99_ms": %.2f, ' ..
    '"max_ms": %.2f, "mean_ms": %.2f}\n',
    summary.requests, summary.duration / 1e6, accepted, refused, errors.connect, errors.read,
    errors.write, errors.status, errors.timeout, latency:percentile(50) / 1000,
    latency:percentile(90) / 1000, latency:percentile(99) / 1000, latency.max / 1000, latency.mean / 1000))
end
