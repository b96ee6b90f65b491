#!/bin/bash
# RSS of a started server: idle, then after 48 /answer requests (a ~250-token context), P at a time (default 8); $1: tree
cd $1
LORASWAP_PREFIX_CACHE_BYTES=${CACHE:-0} CUDA_VISIBLE_DEVICES= HF_HUB_OFFLINE=1 /work/main/.venv/bin/python -m service.cli.entry serve --port 8392 > /tmp/m/serve2.log 2>&1 &
PID=$!
for i in $(seq 90); do curl -s localhost:8392/ready | grep -q true && break; sleep 1; done
echo "$1 idle: $(grep VmRSS /proc/$PID/status)"
seq 48 | xargs -P ${P:-8} -I{} curl -s -o /dev/null -X POST localhost:8392/answer -H 'content-type: application/json' -d "{\"question\":\"What did the committee decide in meeting {}?\",\"context\":\"$(python3 -c 'print(("The committee met on Tuesday and decided to postpone the vote on the new budget until the next session. " * 12).strip())')\"}"
echo "$1 after: $(grep -E 'VmRSS|VmHWM' /proc/$PID/status | tr '\n' ' ')"
awk '/^[0-9a-f]+-[0-9a-f]+ /{name=$6} /^Rss:/{rss[name]+=$2} END{for(n in rss) if (rss[n]>20000) print "   " int(rss[n]/1024) " MB", n}' /proc/$PID/smaps | sort -rn | head -6
kill $PID; wait $PID 2>/dev/null
