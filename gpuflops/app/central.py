"""Composition root for the fleet tier: a daemon's shipping to the central store."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

from gpuflops.app.build import Daemon
from gpuflops.exporter.central_collector import ShipCollector
from gpuflops.ledger.central import CentralConfig, CentralStore
from gpuflops.ledger.ship import RawChainReader, Shipper
from gpuflops.ledger.signing import NODE_KEY_FILENAME, load_or_generate
from gpuflops.ledger.store import LEDGER_FILENAME

log = logging.getLogger(__name__)


def wire_central(d: Daemon, config: CentralConfig) -> Shipper:
    """Ship the daemon's ledger to the central store from a background thread.

    Call before ``wire_jobs``: closers run last-added first, so the shipper's final round then
    runs after the ledger sink's last commit (the clean-stop record ships too).
    Raises KeyFileError when the node key cannot be read or created.
    """
    s = d.settings
    state = Path(s.state_dir)
    key, created = load_or_generate(state / NODE_KEY_FILENAME)
    if created:
        log.info("generated node key %s (public key %s); pin it centrally (docs/fleet.md)",
                 key.path, key.public_key_hex)
    node = s.node_name or socket.gethostname()
    shipper = Shipper(CentralStore(config, application_name=f"gpuflops-ship {node}"),
                      RawChainReader(state / LEDGER_FILENAME), key, node=node,
                      cluster=s.cluster, period_s=s.central_ship_every_s, clock=d.clock)
    d.add_collector(ShipCollector(shipper.status, d.clock))
    shipper.start()
    d.add_closer(shipper.stop)
    log.info("shipping ledger to the central store %s as node %s, cluster %s, every %.0f s",
             config.describe(), node, s.cluster, s.central_ship_every_s)
    return shipper
