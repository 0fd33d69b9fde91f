"""Watching a running job from outside: the Prometheus exporter (``recorun --metrics-port``,
docs/METRICS.md). Needs the ``metrics`` extra (``pip install 'recorun[metrics]'``)."""
