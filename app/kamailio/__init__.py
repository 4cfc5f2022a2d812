"""Kamailio's own replicated state, typed: mirrors of the htable, usrloc and dialog peers.

The shared framework every mirror is built on:

* :mod:`app.kamailio.mirrors` - the :class:`~app.kamailio.mirrors.Mirror` protocol, the
  registry built from ``--kamailio-mirrors`` (:func:`~app.kamailio.mirrors.attach_mirrors`,
  called by the app factory before the gateway starts), the coexistence rule with a raw
  peer of the same id, and the ``/metrics`` collector;
* :mod:`app.kamailio.stream` - :class:`~app.kamailio.stream.ChangeStream`, a bounded,
  resumable stream of changes (epoch, offsets, ``since``/``epoch``, ``gap``);
* :mod:`app.kamailio.ws` - :func:`~app.kamailio.ws.serve_changes`, the ``GET .../changes``
  WebSocket endpoint with the subscribe path's frames and close codes;
* :mod:`app.kamailio.bootstrap` - :class:`~app.kamailio.bootstrap.SyncBootstrap`, which
  asks exactly one node for a sync, each request sent once;
* :mod:`app.kamailio.malformed` - per-sender accounting of unreadable bodies (400).

The mirrors: :mod:`app.kamailio.htable` (with its codec in
:mod:`app.kamailio.htable_codec`), :mod:`app.kamailio.registrations` (peer ``usrloc``,
codec :mod:`app.kamailio.usrloc`) and :mod:`app.kamailio.dialogs` (peer ``dialog``,
codec :mod:`app.kamailio.dialog`).
"""
