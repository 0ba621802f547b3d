"""``[overlay] handshake_timeout``: seconds a connection to the overlay or bulk port has
to complete its TLS handshake (issue 11); default 10, bounded, errors name the key."""
from __future__ import annotations

from pathlib import Path

import pytest

from pacsp2p import config
from pacsp2p.config import ConfigError
from pacsp2p.overlay import tls


def overlay(**keys):
    return config.from_dict({"overlay": {"tls_dir": "tls", **keys}}, "etc/peer.toml",
                            Path("/srv/pacs")).overlay


def test_default_is_the_module_constant():
    assert overlay().handshake_timeout == tls.HANDSHAKE_TIMEOUT == 10.0


def test_a_number_of_seconds_is_taken():
    assert overlay(handshake_timeout=2).handshake_timeout == 2.0
    assert overlay(handshake_timeout=0.5).handshake_timeout == 0.5


@pytest.mark.parametrize("value", [0, -1, 301, "10", True])
def test_out_of_range_or_not_a_number_is_refused_naming_the_key(value):
    with pytest.raises(ConfigError) as e:
        overlay(handshake_timeout=value)
    assert "etc/peer.toml" in str(e.value) and "handshake_timeout" in str(e.value)
