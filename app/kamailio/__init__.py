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

Adding a mirror: a module here with a class that has the attributes and
methods of :class:`~app.kamailio.mirrors.Mirror` (``handle`` parses with a strict codec
and answers :data:`~app.kamailio.malformed.BAD_REQUEST` through its
:class:`~app.kamailio.malformed.MalformedBodies`; ``init`` calls a
:class:`~app.kamailio.bootstrap.SyncBootstrap`, and ``handle`` tells it of each sync
answer with ``answer_seen``; changes go to its ``streams``); one line in
``mirrors._factories``; its routes in ``app/api/routes/`` (HTTP router with the token
dependency, WebSocket router calling :func:`~app.kamailio.ws.serve_changes`), included
in ``app/api/app.py``; its ``.../changes`` path in :data:`app.kamailio.ws.CHANGE_CHANNELS`
for the AsyncAPI document.
"""
