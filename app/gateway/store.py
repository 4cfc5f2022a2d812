"""Registered peers, kept in ``<state dir>/peers.json`` so that they survive a restart.

Writes go to a temporary file that replaces the old one, so a crash mid-write leaves
either the old or the new registry, never half of one.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from app.gateway.models import PeerSettings

log = logging.getLogger("dmq.gateway")


class PeerStore:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / "peers.json"

    def load(self) -> dict[str, PeerSettings]:
        if not self.path.exists():
            return {}
        try:
            data: Any = json.loads(self.path.read_text())
            peers = data["peers"]
            return {str(k): PeerSettings.from_json(v) for k, v in peers.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # Keep the damaged file for an operator and start without it.
            broken = self.path.with_suffix(".json.broken")
            log.error("cannot read %s (%s); moved it to %s", self.path, exc, broken)
            os.replace(self.path, broken)
            return {}

    def save(self, peers: dict[str, PeerSettings]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        payload = {"version": 1, "peers": {k: v.to_json() for k, v in sorted(peers.items())}}
        fd, tmp = tempfile.mkstemp(prefix=".peers-", suffix=".json", dir=self.state_dir)
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(payload, handle, indent=2)
                handle.write("\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
