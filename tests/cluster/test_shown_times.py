"""Every time a real peer shows is a date of now: ``GET /status``, ``/metrics``, the audit
trail, the console and ``pacsp2p status``.

A peer's reactor times its calls by ``time.monotonic`` (``pacsp2p.clock``: seconds since
boot, ~5e4); a reactor time shown as a date reads 1970-01-01 + some hours. Two real peers
(twistd, so the monotonic reactor), a 70-instance stream stored at one (its end of stream
told, its copies replicated, members seen alive), a scrub pass run; then every number
under a time's name in /status (``*_at``, ``since``, ``started``, ``finished``, ``last``,
``at``: what ``admin.display`` shows as dates) lies between a day ago and the next scrub
(7 days ahead), and no page or line says 1970.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pacsp2p.testing.cluster import get_json, store_study, wait_replicated, wait_until

N = 70                  # > dissemination.STREAK_FACTS: the writer tells an end of stream
TIME_KEYS = ("since", "started", "finished", "last", "at")
DAY = 86400.0


def _times(value, path="") -> list:
    """(path, number) of every number under a time's name in *value* (a status dict)."""
    found = []
    if isinstance(value, dict):
        for key, v in value.items():
            p = f"{path}.{key}"
            if isinstance(v, (int, float)) and not isinstance(v, bool) and \
                    (key.endswith("_at") or key in TIME_KEYS):
                found.append((p, v))
            else:
                found += _times(v, p)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += _times(v, f"{path}[{i}]")
    return found


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=60) as r:
        return r.read().decode()


def test_a_peer_shows_every_time_as_a_date_of_now(cluster, tmp_path):
    a, b = cluster.start(2)
    cluster.wait_mesh()
    study, _ = store_study(a, tmp_path / "study", "SHOWNTIMES", N)
    wait_replicated(a, study, N, timeout=120)
    req = urllib.request.Request(f"{a.admin_url}/scrub", data=b'{"rate": null}',
                                 method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert "pass" in json.load(r)

    def shown():
        s = get_json(a)
        return s["overlay"]["dissemination"]["ends_told"] and s["scrub"]["last"] and \
            s["under_replicated"]["at"]
    wait_until(shown, 60, what="peera told the end of its stream, ran its scrub pass and "
                               "counted its under-replicated instances")
    now = time.time()
    seen = {}
    for p in (a, b):
        for path, t in _times(get_json(p)):
            seen[f"{p.name}{path}"] = t
    print(json.dumps(seen, indent=1))
    for must in ("peera.overlay.dissemination.end_told_at", "peera.overlay.members[1].since",
                 "peera.under_replicated.at", "peera.scrub.last.started"):
        assert must in seen, (must, sorted(seen))
    wrong = {k: v for k, v in seen.items() if not now - DAY < v < now + 8 * DAY}
    assert not wrong, f"not dates of now (now {now:.0f}): {wrong}"
    metrics = _get(f"{a.admin_url}/metrics")
    stamp = re.search(r"^pacsp2p_under_replicated_counted_timestamp_seconds (\S+)$", metrics,
                      re.M)
    assert stamp and now - DAY < float(stamp.group(1)) <= now + 1, stamp
    dates = [json.loads(line)["EventIdentification"]["EventDateTime"]
             for line in (Path(a.data_dir) / "audit.log").read_text().splitlines()
             if line.strip()]
    today = time.strftime("%Y-%m-%d", time.gmtime(now))
    yesterday = time.strftime("%Y-%m-%d", time.gmtime(now - DAY))
    assert dates and all(d[:10] in (today, yesterday) for d in dates), dates[:5]
    cli = subprocess.run([str(Path(sys.executable).parent / "pacsp2p"), "--config",
                          str(a.config_path), "status"], capture_output=True, text=True,
                         timeout=120)
    assert cli.returncode == 0 and "scrub: last pass" in cli.stdout, cli.stdout + cli.stderr
    pages = [_get(f"{a.admin_url}/console/{page}") for page in ("", "retrievals")]
    for text in [cli.stdout] + pages:
        assert "1970" not in text, text
