"""``[facade]`` limits on hostile input (issue 11): defaults, values, and one-line errors."""
from __future__ import annotations

from pathlib import Path

import pytest

from pacsp2p import config
from pacsp2p.dicom import acceptor


def facade(**keys):
    return config.from_dict({"facade": keys}, "peer.toml", Path(".")).facade


def test_defaults_are_the_acceptors():
    f = facade()
    assert (f.max_pending, f.max_per_address, f.artim_timeout, f.idle_timeout,
            f.max_dataset, f.fd_reserve, f.min_peer_pdu) == (
        acceptor.MAX_PENDING, acceptor.MAX_PER_ADDRESS, acceptor.ARTIM, acceptor.IDLE,
        acceptor.MAX_DATASET, acceptor.FD_RESERVE, acceptor.MIN_PEER_PDU)
    assert (f.max_pending, f.max_per_address, f.artim_timeout, f.idle_timeout,
            f.max_dataset, f.fd_reserve, f.min_peer_pdu) == (
        64, 16, 30.0, 60.0, 4 << 30, 64, 4096)


def test_values():
    f = facade(max_pending=8, max_per_address=2, artim_timeout=1, idle_timeout=2.5,
               max_dataset=1 << 20, fd_reserve=0, min_peer_pdu=0)
    assert (f.max_pending, f.max_per_address, f.artim_timeout, f.idle_timeout,
            f.max_dataset, f.fd_reserve, f.min_peer_pdu) == (8, 2, 1.0, 2.5, 1 << 20, 0, 0)
    assert isinstance(f.artim_timeout, float)


@pytest.mark.parametrize("key, value, message", [
    ("max_pending", 0, "peer.toml: facade.max_pending: must be an integer >= 1, got 0"),
    ("max_per_address", "16", "facade.max_per_address: must be an integer >= 1, got '16'"),
    ("artim_timeout", 0, "facade.artim_timeout: must be seconds (a number > 0, <= 86400), "
                         "got 0"),
    ("idle_timeout", True, "facade.idle_timeout: must be seconds (a number > 0, <= 86400), "
                           "got True"),
    # a timer of 1e308 s was taken: the peer started with that timer in effect off
    ("artim_timeout", 1e308, "facade.artim_timeout: must be seconds (a number > 0, <= 86400), "
                             "got 1e+308"),
    ("idle_timeout", 86401, "facade.idle_timeout: must be seconds (a number > 0, <= 86400), "
                            "got 86401"),
    ("max_dataset", 10, "facade.max_dataset: must be an integer (bytes) >= 1024, got 10"),
    ("fd_reserve", -1, "facade.fd_reserve: must be an integer >= 0 (0: no check), got -1"),
    ("min_peer_pdu", 1.5, "facade.min_peer_pdu: must be an integer (bytes) >= 0 (0: any)"),
])
def test_errors_name_file_key_and_reason(key, value, message):
    with pytest.raises(config.ConfigError) as e:
        facade(**{key: value})
    assert message in str(e.value)
