"""A site's adapter written to docs/adapters.md's ``IKeeps`` (``keep(received, meta)``:
no descriptor), loaded from its file by a real lone peer (the ingest's one-job path):
it starts, and each C-STORE is kept from a file with a name, byte-identical.

Before, IKeeps.keep had become ``keep(received, meta, fd=None)`` (81b4a3b: a received
file with no name, kept from its descriptor): such an adapter failed the interface check
and the peer refused to start ("IKeeps.keep(received, meta, fd=None): implementation
doesn't allow enough arguments"); the embedded archive still takes the descriptor."""
from __future__ import annotations

from pydicom.uid import ExplicitVRLittleEndian

from pacsp2p.testing import Peer, datasets, storescu
from pacsp2p.testing import dicomnet as dn

SITE = '''
from pacsp2p.adapters.embedded import EmbeddedArchive


class SiteKeeper(EmbeddedArchive):
    """A site's archive that keeps files as IKeeps says: keep(received, meta)."""

    def keep(self, received, meta):
        assert received.exists(), received        # a file with a name, always
        return super().keep(received, meta)
'''

N = 6


def test_a_site_adapter_written_to_ikeeps_keeps_every_instance(tmp_path):
    plugin = tmp_path / "site_keeper.py"
    plugin.write_text(SITE)
    files = datasets.make_study(tmp_path / "s", patient_id="SITEKEEP", size=32,
                                series=[("CT", N, ExplicitVRLittleEndian)])
    peer_dir = tmp_path / "peer"
    peer_dir.mkdir()
    with Peer(peer_dir, config={"archives": [{"name": "local",
                                              "adapter": f"{plugin}:SiteKeeper"}]}) as peer:
        proc = storescu(peer.port, peer.ae_title, files, extra=["-v"], timeout=300)
        out = proc.stdout + proc.stderr
        assert out.count("Received Store Response (Success)") == N, out[-3000:]
        assert dn.dataset_hashes(dn.archive_files(peer.data_dir)) == \
            dn.dataset_hashes(files)
        log = peer.log_path.read_text()
        assert "AssertionError" not in log and "Traceback" not in log, log[-3000:]
