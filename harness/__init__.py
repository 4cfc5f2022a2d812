"""The processes the tests and the benchmarks run, started and stopped one way.

* :mod:`harness.ports`: :func:`~harness.ports.free_port`, a loopback port free for
  UDP and TCP.
* :mod:`harness.waiting`: :func:`~harness.waiting.wait_until`, the one polling loop.
* :mod:`harness.gateway`: :class:`~harness.gateway.Gateway`, a ``dmq-gateway serve``
  process (with a retry when another process takes one of its ports first), and
  :data:`~harness.gateway.FAST_TIMERS`.
* :mod:`harness.kamailio`: :class:`~harness.kamailio.KamailioNode`, a real Kamailio
  running ``examples/kamailio/kamailio.cfg``.

Nothing here depends on pytest, so ``python -m bench.x`` imports it as the tests do.
"""
