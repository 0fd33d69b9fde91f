"""``recorun-bench``: the paper's studies, reproducible by one command each.

* ``clients``: N simultaneous single-thread recorun processes against one server, for N in a
  list: throughput versus clients, per-event time distributions, input bandwidth
  (the paper's figures 3, 5, 6, 7);
* ``batching``: the same scan for DeepCalo with dynamic batching off/on and 1 or 2 model
  instances (paper section 5.3.1);
* ``hlt``: per-event time of ``workflow_hlt.yaml`` (FACILE as a service) against
  ``workflow_hlt_nominal.yaml`` (MAHI-like fit on the CPU) at the same thread count;
* ``projection``: the scaling calculator fed with per-GPU throughputs and measured request
  sizes (paper section 6);
* ``load``: open-loop load on one model (requests at fixed rates whatever the server answers,
  as Triton's perf_analyzer): latency percentiles and achieved throughput against offered rate.

Each writes ``<study>.json`` and PNG plots into ``--out`` (default ``results/``). Modules:
:mod:`.runs` (servers and client processes), :mod:`.plots` (matplotlib), :mod:`.cli`.
"""
