#!/bin/bash
# native threads of a started server, after one /answer; $1: tree
cd $1
CUDA_VISIBLE_DEVICES= HF_HUB_OFFLINE=1 /work/main/.venv/bin/python -c "from service.cli.main import main; import sys; sys.exit(main(sys.argv[1:]))" serve --port 8391 > /tmp/m/serve.log 2>&1 &
PID=$!
for i in $(seq 90); do curl -s localhost:8391/ready | grep -q true && break; sleep 1; done
for i in 1 2 3; do curl -s -X POST localhost:8391/answer -H 'content-type: application/json' -d '{"question":"Who went home?","context":"Bob went home after the long meeting on Tuesday."}' > /dev/null; done
echo "$1: $(ls /proc/$PID/task | wc -l) native threads; $(for t in /proc/$PID/task/*; do cat $t/comm; done | sort | uniq -c | tr '\n' ' ')"
kill $PID; wait $PID 2>/dev/null
