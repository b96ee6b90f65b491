"""``loraswap loadtest``: locust scenarios whose every answer is checked against an answer key made before the load
(docs/reliability.md). ``options`` (the command, light), ``scenarios`` (what each scenario sends), ``asks`` (the
requests and what a reply answers), ``answer_key`` (the reference pass and the verdict on each reply), ``adapters``
(distinguishable adapters derived from a registered one), ``traffic`` (sending and grading, the churn), ``users``
(them as locust users), ``server_view`` (the server's own /metrics, before and after), ``report`` (the figures),
``run`` (all of it in order; ``run_load`` is the library entry)."""
