-- wrk script: POST the same /keys/query body (BENCH_BODY) with bearer
-- tokens read from BENCH_TOKENS, one per line. With one token the request
-- is built once; with several, each request takes the next one (each wrk
-- thread cycles through all of them from its own starting point).
local tokens = {}
for line in io.lines(os.getenv("BENCH_TOKENS")) do
    tokens[#tokens + 1] = line
end
wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. tokens[1]

if #tokens > 1 then
    local i = math.random(#tokens)
    request = function()
        i = i % #tokens + 1
        wrk.headers["Authorization"] = "Bearer " .. tokens[i]
        return wrk.format()
    end
end
