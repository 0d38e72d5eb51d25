"""Composition root for the fleet tier: a daemon's shipping, and ``central serve``."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.registry import CollectorRegistry

from gpuflops.compliance.fleet_status import SnapshotRefresher, build_snapshot
from gpuflops.compliance.thresholds import ProgramsConfig
from gpuflops.config import Settings, SettingsError
from gpuflops.exporter.central_collector import FleetCollector
from gpuflops.exporter.http import MetricsServer
from gpuflops.ledger.central import CentralConfig, CentralStore
from gpuflops.ledger.central_read import CentralReader
from gpuflops.ledger.records import LEDGER_FILENAME
from gpuflops.ledger.ship import RawChainReader, Shipper
from gpuflops.ledger.signing import NODE_KEY_FILENAME, load_or_generate

log = logging.getLogger(__name__)


def central_config(s: Settings) -> CentralConfig:
    """The central store's connection from the settings; SettingsError when unusable."""
    from gpuflops.ledger.central import CentralError

    assert s.central_url is not None
    pw = Path(s.central_password_file) if s.central_password_file else None
    try:
        return CentralConfig.from_options(s.central_url, pw)
    except CentralError as e:
        raise SettingsError(str(e)) from None


def start_shipper(s: Settings, clock: Callable[[], float]) -> Shipper:
    """Ship the daemon's ledger to the central store from a background thread.

    The composition root adds its ``stop`` to the closers before the ledger sink's, so the
    final round runs after the sink's last commit (the clean-stop record ships too). Raises
    KeyFileError when the node key cannot be read or created.
    """
    config = central_config(s)
    state = Path(s.state_dir)
    key, created = load_or_generate(state / NODE_KEY_FILENAME)
    if created:
        log.info("generated node key %s (public key %s); pin it centrally (docs/fleet.md)",
                 key.path, key.public_key_hex)
    node = s.node_name or socket.gethostname()
    shipper = Shipper(CentralStore(config, application_name=f"gpuflops-ship {node}"),
                      RawChainReader(state / LEDGER_FILENAME), key, node=node,
                      cluster=s.cluster, period_s=s.central_ship_every_s, clock=clock)
    shipper.start()
    log.info("shipping ledger to the central store %s as node %s, cluster %s, every %.0f s",
             config.describe(), node, s.cluster, s.central_ship_every_s)
    return shipper


class FleetServer:
    """``gpuflops central serve``: the store read every ``refresh_s`` into a snapshot, served as
    ``gpuflops_fleet_*`` on /metrics; /healthz answers 503 while the store cannot be read."""

    def __init__(self, config: CentralConfig, listen: str, fallback: ProgramsConfig,
                 refresh_s: float, **http_kwargs: Any) -> None:
        self.store = CentralStore(config, application_name="gpuflops-central-serve")
        reader = CentralReader(self.store)
        self.refresher = SnapshotRefresher(lambda now: build_snapshot(reader, fallback, now),
                                           refresh_s)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(FleetCollector(self.refresher.snapshot))
        self.server = MetricsServer(registry, listen, self._health, **http_kwargs)
        self.refresher.start()
        self.server.start()

    @property
    def port(self) -> int:
        return self.server.port

    def _health(self) -> tuple[bool, str]:
        if self.refresher.snapshot().up:
            return True, "ok"
        return False, "the central store cannot be read"

    def close(self) -> None:
        self.server.stop()
        self.refresher.stop()
        self.store.close()
