#!/usr/bin/env bash
# alternate old and new servers under docs/results/drain_keepalive/mixed_clients.py (40 clients, SIGTERM at 6 s), 3 rounds
# usage: OLD=CHECKOUT bash docs/results/drain_keepalive/streams_ab.sh  (from the repository root; port 8940; logs in /tmp/term)
mkdir -p /tmp/term
python=${PYTHON:-$PWD/.venv/bin/python}
for round in 1 2 3; do
  for which in old new; do
    tree=$PWD; [ $which = old ] && tree="$OLD"
    (cd $tree && exec $python -m service.cli.entry serve --port 8940) > /tmp/term/ab_${which}_$round.serve.log 2>&1 &
    pid=$!
    until curl -s localhost:8940/ready | grep -q true; do sleep 1; done
    $python docs/results/drain_keepalive/mixed_clients.py 8940 $pid 40 > /tmp/term/ab_${which}_$round.txt 2>&1
    wait $pid
    echo "$which $round: $(grep -c 'EXC at' /tmp/term/ab_${which}_$round.txt) lost; $(grep 'server gone' /tmp/term/ab_${which}_$round.txt)"
  done
done
