"""``twistd pacsp2p`` options and makeService (the plugin's module, as twistd expects)."""

from __future__ import annotations

import sys
import warnings

from twisted.python import usage

from pacsp2p import config


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = ("Run one pacsp2p peer. With no config: the embedded archive under "
                "./pacsp2p-data and the DICOM facade PACSP2P on port 11112.")
    optParameters = [["config", "c", None, "TOML config file (see etc/pacsp2p.toml)"]]


def makeService(options):
    from pacsp2p.overlay.tls import TLSError
    from pacsp2p.service import PeerService
    # pydicom warns about each invalid value it decodes (a hostile identifier, a data set)
    # with the value in the text: every distinct one was a log line with a URL and an
    # entry of the warnings registry kept for ever. The peer says what it refuses itself.
    warnings.filterwarnings("ignore", category=UserWarning, module="pydicom")
    try:
        settings = config.load(options["config"])
        return PeerService(settings)
    except (config.ConfigError, TLSError) as e:
        print(f"pacsp2p: {e}", file=sys.stderr)
        raise SystemExit(2)
