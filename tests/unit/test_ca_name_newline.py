"""``tls.issue`` checks the certificate holder's name before it names files with it (a
peer's: 1-64 letters, digits, '.', '_', '-'; 91e496a). The check was
``re.match(r"^...$")``: ``$`` also matches before a final newline, so "peer1\\n" passed
and ``pacsp2p ca issue DIR $'peer1\\n'`` wrote ``peer1\\n.crt`` and ``peer1\\n.key``
(a certificate for a name no config takes). A real CA in a temporary directory."""
from __future__ import annotations

import pytest

from pacsp2p.overlay import tls


@pytest.mark.parametrize("kind", ["peer", "server"])
def test_a_name_with_a_final_newline_is_refused_and_writes_nothing(tmp_path, kind):
    tls.init_ca(tmp_path, tls.CLUSTER_CA if kind == "peer" else tls.DICOM_CA)
    before = set(tmp_path.iterdir())
    with pytest.raises(tls.TLSError):
        tls.issue(tmp_path, "peer1\n", kind=kind)
    assert set(tmp_path.iterdir()) == before
    crt, key = tls.issue(tmp_path, "peer1", kind=kind)      # the name without it: issued
    assert crt.name == "peer1.crt" and key.exists()
