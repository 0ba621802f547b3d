"""The peer's settings as typed, frozen values (what ``config.load`` returns).

Read-only data every part may hold; ``pacsp2p.config`` parses TOML into them and
re-exports them, so ``from pacsp2p.config import Destination`` keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PORT = 11112
DEFAULT_AE = "PACSP2P"
RIGHTS = ("store", "find", "move", "get")       # what a calling AE may be allowed to do


class ConfigError(Exception):
    """A configuration problem, with a one-line message naming file, key and reason."""


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int
    mode: str = "relay"
    tls: bool = False                 # DICOM TLS towards it (relay mode only)
    tls_cert: Path | None = None      # our client certificate ([facade] tls_cert)
    tls_key: Path | None = None
    tls_ca: Path | None = None        # the CA its certificate must chain to
    associations: int = 1             # a C-MOVE's C-STOREs over up to this many at once


@dataclass(frozen=True)
class Modality:
    """A calling AE title declared under ``[modalities]``: where it may come from, what it
    may do, where it may send (C-MOVE), and the TLS client certificate it must show."""

    ae_title: str
    hosts: tuple[str, ...] = ()       # IP addresses, CIDR networks, host names; () = any
    allow: tuple[str, ...] = RIGHTS
    move_to: tuple[str, ...] | None = None    # [destinations] it may move to; None = any
    certificate: str | None = None    # common name of its required TLS client certificate


@dataclass(frozen=True)
class ArchiveConfig:
    name: str
    adapter: str = "embedded"
    site: str | None = None
    options: dict = field(default_factory=dict)
    max_fetches: int | None = None    # instances read at once at most (None: the adapter's)


@dataclass(frozen=True)
class PeerSettings:
    name: str
    data_dir: Path


@dataclass(frozen=True)
class FacadeSettings:
    ae_title: str = DEFAULT_AE
    port: int = DEFAULT_PORT
    bind: str = "0.0.0.0"
    allowed_calling_aes: tuple[str, ...] = ()
    max_pdu: int = 0  # 0 = unlimited
    max_associations: int = 32
    max_pending: int = 64         # connections without an association yet
    max_per_address: int = 16     # connections (pending or not) from one address
    artim_timeout: float = 30.0   # seconds for the A-ASSOCIATE-RQ (PS3.8 9.1.5)
    idle_timeout: float = 60.0    # seconds without traffic before an abort
    max_dataset: int = 4 << 30    # largest C-STORE data set (bytes)
    fd_reserve: int = 64          # file descriptors kept free (0: no check)
    min_peer_pdu: int = 4096      # smallest requestor maximum PDU accepted (0: any)
    commitment_wait: float = 30.0  # seconds a storage commitment waits for copies
    tls_port: int = 0             # DICOM TLS port (0: none)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None    # CA of client certificates (and of TLS destinations)
    tls_require_client_cert: bool = True
    tls_only: bool = False        # serve the TLS port only, not the plain one
    check_called_ae: bool = True  # the called AE title must be ae_title
    check_modality_host: bool = True  # a [modalities] AE only from its declared hosts
    allow_unknown: tuple[str, ...] = RIGHTS   # rights of AEs not in [modalities]
    keep_compressed: bool = True  # a storage context's compressed syntax before uncompressed


@dataclass(frozen=True)
class OverlaySettings:
    port: int = 11114
    bulk_port: int = 11115
    read_port: int = 0                # instance reads in threads (0: any free; -1: none)
    push_port: int = 0                # pushed copies in threads (0: any free; -1: none)
    bind: str = "0.0.0.0"
    advertise: str = ""
    seeds: tuple[tuple[str, int], ...] = ()
    tls_dir: Path = Path("tls")
    heartbeat: float = 0.5            # SWIM protocol period: one probe per period
    phi_threshold: float = 8.0        # (unused since overlay protocol 4: SWIM)
    handshake_timeout: float = 10.0   # seconds to complete TLS, else dropped
    probe_timeout: float = 0.0        # seconds to wait for a direct ack (0: heartbeat / 2)
    indirect_probes: int = 3          # members asked to probe a silent one
    suspicion_mult: float = 2.5       # min suspicion = mult * log10(N) * heartbeat
    gossip_interval: float = 0.2      # seconds between gossip messages (while news)
    gossip_fanout: int = 3            # members each gossip round goes to
    max_links: int = 32               # overlay links kept open (LRU pool)
    pull_interval: float = 0.5        # min seconds between two catalog pulls


@dataclass(frozen=True)
class ClusterSettings:
    replicas: int = 1
    write_quorum: int = 1
    repair_after: float = 600.0   # seconds a peer/archive is dead before its copies are remade
    repair_rate: float = 50.0     # MB/s of repair copies per peer (0: no limit)
    scrub_rate: float = 20.0      # MB/s a background scrub reads per peer (0: no limit)
    scrub_interval: float = 604800.0   # seconds between two full scrub passes (0: none)
    scrub_sample: float = 0.01    # fraction a pass checks of an archive read over DIMSE


@dataclass(frozen=True)
class StrategySettings:
    placement: str = "rendezvous"
    selection: str = "nearest"
    balancing: str = "work-stealing"
    plugins: tuple[str | Path, ...] = ()    # entry-point names (str) and files (Path)
    options: dict = field(default_factory=dict, hash=False)
    # where a new instance's first copy goes: "local" (an archive of the peer that received
    # it, while it holds at most (1 + first_copy_slack) x the mean count of the archives
    # placement may choose), "placement" (the strategy's order), or "auto": local where
    # rendezvous or site-aware ranked it, the strategy's order where a plugin or least-used did
    first_copy: str = "auto"
    first_copy_slack: float = 1.0


@dataclass(frozen=True)
class AdminSettings:
    bind: str = "127.0.0.1"
    port: int = 11180
    # console users: name -> scrypt hash ('pacsp2p admin hash-password'); docs/operations.md
    users: dict = field(default_factory=dict, hash=False)
    tls_cert: Path | None = None      # HTTPS (with tls_key)
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # client certificates of this CA authenticate
    # the console's other origins ("https://pacs.example.org" of a reverse proxy)
    origins: tuple[str, ...] = ()

    @property
    def authenticates(self) -> bool:
        """Can anyone authenticate (users, or client certificates over HTTPS)?"""
        return bool(self.users) or (self.tls_cert is not None and
                                    self.tls_client_ca is not None)


@dataclass(frozen=True)
class AuditSettings:
    """``[audit]``: the audit trail in ``<data_dir>/audit.log`` (``pacsp2p.audit``)."""

    enabled: bool = True
    max_bytes: int = 50 << 20     # rotated when it would grow past this
    backups: int = 10             # audit.log.1 .. audit.log.N kept


@dataclass(frozen=True)
class StorageSettings:
    fsync: bool = True
    sync_directories: bool = False


@dataclass(frozen=True)
class Settings:
    source: str
    peer: PeerSettings
    facade: FacadeSettings
    destinations: dict[str, Destination]
    archives: tuple[ArchiveConfig, ...]
    storage: StorageSettings
    admin: AdminSettings = AdminSettings()
    overlay: OverlaySettings | None = None     # None: a peer on its own
    cluster: ClusterSettings = ClusterSettings()
    strategies: StrategySettings = StrategySettings()
    modalities: dict[str, Modality] = field(default_factory=dict)
    audit: AuditSettings = AuditSettings()

    @property
    def data_dir(self) -> Path:
        return self.peer.data_dir
