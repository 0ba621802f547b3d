"""``pacsp2p check-config`` checks everything ``twistd pacsp2p`` checks before it starts
(issue 14): one table of broken configs, each refused by both with the same one-line
message (``pacsp2p.preflight`` is shared by both; this holds them to it)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pacsp2p.testing.peer import twistd_path
from pacsp2p.testing.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
PIN = ROOT / "plugins" / "pin_modality.py"

RANKER = '''
from pacsp2p.strategies import hookimpl

name = "others-first"

@hookimpl
def pacsp2p_rank_replicas(instance, locations, reader):
    return sorted(locations, key=lambda loc: loc.peer == reader.name)
'''

# (id, config text after [peer]/[admin], files to write {name: text}, what the line says)
BROKEN = [
    ("selection-unknown", '[strategies]\nselection = "fastest"\n', {},
     "strategies.selection: unknown selection strategy 'fastest' (known: nearest)"),
    ("balancing-names-a-ranker", '[strategies]\nplugins = ["rank.py"]\n'
     'balancing = "others-first"\n', {"rank.py": RANKER},
     "strategies.balancing: unknown balancing strategy 'others-first' "
     "(known: work-stealing, single)"),
    ("placement-unknown", '[strategies]\nplacement = "random"\n', {},
     "(known: rendezvous, least-used, site-aware)"),
    ("plugin-file-missing", '[strategies]\nplugins = ["nope.py"]\n', {},
     "strategies.plugins[0]: "),
    ("plugin-file-broken", '[strategies]\nplugins = ["bad.py"]\n', {"bad.py": "1/0\n"},
     "cannot load: ZeroDivisionError"),
    ("entry-point-missing", '[strategies]\nplugins = ["cost_place"]\n', {},
     "strategies.plugins[0]: no strategy plugin 'cost_place' is installed"),
    ("options-nobody-owns", '[strategies.options.pin_modality]\nMG = "x"\n', {},
     "strategies.options.pin_modality: no enabled plugin is named 'pin_modality'"),
    ("plugin-refuses-options", f'[strategies]\nplugins = ["{PIN}"]\n'
     '[strategies.options.pin-modality]\nMG = 3\n', {},
     "strategies.options.pin-modality: plugin 'pin-modality' refused them: ValueError"),
    ("plugin-names-clash", '[strategies]\nplugins = ["rank.py", "rank2.py"]\n',
     {"rank.py": RANKER, "rank2.py": RANKER},
     "strategies.plugins[1]: a strategy named 'others-first' is already enabled"),
    ("adapter-unknown", '[[archives]]\nname = "a"\nadapter = "vna"\n', {},
     "archives.a.adapter: unknown adapter 'vna'"),
    ("adapter-option-unknown", '[[archives]]\nname = "o"\nadapter = "orthanc"\n'
     'url = "http://127.0.0.1:8042"\ncolour = "red"\n', {},
     "archives[0].colour: unknown key for adapter 'orthanc'"),
    ("adapter-option-missing", '[[archives]]\nname = "o"\nadapter = "orthanc"\n', {},
     "archives[0].url: required by adapter 'orthanc'"),
    ("adapter-rate-zero", '[[archives]]\nname = "o"\nadapter = "orthanc"\n'
     'url = "http://127.0.0.1:8042"\ncrawl_qps = 0\n', {},
     "archives[0].crawl_qps: must be a positive number"),
    ("adapter-timeout-infinite", '[[archives]]\nname = "o"\nadapter = "orthanc"\n'
     'url = "http://127.0.0.1:8042"\ntimeout = inf\n', {},
     "archives[0].timeout: must be a positive number, got inf"),
    ("dimse-timeout-too-long", '[[archives]]\nname = "p"\nadapter = "dimse"\n'
     'ae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\ntimeout = 86400\n', {},
     "archives.p.timeout: must be at most 3600 seconds, got 86400"),
    ("dimse-find-rows-too-few", '[[archives]]\nname = "p"\nadapter = "dimse"\n'
     'ae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\nmax_find_rows = 5\n', {},
     "archives.p.max_find_rows: must be an integer >= 10, got 5"),
    ("dicomweb-max-studies-text", '[[archives]]\nname = "w"\nadapter = "dicomweb"\n'
     'url = "http://127.0.0.1:8042/dicom-web"\nmax_studies = "many"\n', {},
     "archives[0].max_studies: must be an integer >= 1, got 'many'"),
    ("embedded-option-unknown", '[[archives]]\nname = "l"\nsize = 3\n', {},
     "archives.l.size: unknown key for adapter 'embedded'"),
    ("max-fetches-zero", '[[archives]]\nname = "l"\nmax_fetches = 0\n', {},
     "archives[0].max_fetches: must be an integer >= 1, got 0"),
    ("tls-files-missing", '[overlay]\nport = {port}\ntls_dir = "no-tls"\n', {},
     "no-tls"),
    ("max-associations-zero", '[facade]\nmax_associations = 0\n', {},
     "facade.max_associations: must be an integer >= 1, got 0"),
    ("port-out-of-range", '[facade]\nport = 70000\n', {},
     "facade.port: must be an integer 1-65535, got 70000"),
    ("quorum-above-replicas", '[cluster]\nreplicas = 1\nwrite_quorum = 2\n', {},
     "cluster.write_quorum: must be 1..replicas (1), got 2"),
    ("replicas-zero", '[cluster]\nreplicas = 0\n', {}, "cluster.replicas: must be >= 1"),
    ("phi-threshold-zero", '[overlay]\nport = {port}\ntls_dir = "tls"\nphi_threshold = 0\n',
     {}, "overlay.phi_threshold: must be a number > 0, got 0"),
    ("heartbeat-zero", '[overlay]\nport = {port}\ntls_dir = "tls"\nheartbeat = 0\n', {},
     "overlay.heartbeat: must be 0.05-10 seconds"),
    # a careless admin (2026-12-07): before, check-config said "ok" to each of these
    ("port-twice", '[facade]\nport = {admin_port}\n', {},
     "admin.port: {admin_port} is facade.port too (on 0.0.0.0)"),
    ("bulk-port-is-the-facades", '[facade]\nport = {port}\n[overlay]\nport = {port-1}\n'
     'tls_dir = "tls"\n', {}, "overlay.bulk_port: {port} is facade.port too (on 0.0.0.0)"),
    ("replicas-beyond-any-integer", '[cluster]\nreplicas = 99999999999999999999999\n', {},
     "cluster.replicas: must be an integer >= 1, at most 2^53, got 99999999999999999999999"),
    ("data-dir-a-file", '', {"data": "not a directory"}, "peer.data_dir: "),
    ("tls-dir-a-file", '[overlay]\nport = {port}\ntls_dir = "tls"\n', {"tls": "a file"},
     "overlay.tls_dir: "),
    ("tls-files-not-pem", '[overlay]\nport = {port}\ntls_dir = "tls"\n',
     {"tls/ca.crt": "garbage", "tls/north.crt": "garbage", "tls/north.key": "garbage"},
     "overlay.tls_dir: "),
    ("tls-ca-a-directory", '[overlay]\nport = {port}\ntls_dir = "tls"\n',
     {"tls/ca.crt/x": "a directory"}, "overlay.tls_dir: "),
    ("embedded-path-a-file", '[[archives]]\nname = "l"\npath = "store"\n',
     {"store": "a file"}, "archives.l.path: "),
    ("facade-bind-no-address", '[facade]\nbind = "999.1.1.1"\n', {},
     "facade.bind: must be an IP address or a host name, got '999.1.1.1'"),
    ("audit-backups-beyond-use", '[audit]\nbackups = 100000000\n', {},
     "audit.backups: must be an integer 1-10000, got 100000000"),
    # thirteenth hostile-input session: before, a RecursionError traceback (3,002 lines)
    # from tomllib; a key holding a line feed printed as two lines
    ("toml-nested-too-deep", "x = " + "[" * 5000 + "]" * 5000 + "\n", {},
     "not valid TOML: arrays or tables nested too deep"),
    ("toml-tables-nested-too-deep", "x = " + "{a = " * 5000 + "1" + "}" * 5000 + "\n", {},
     "not valid TOML: arrays or tables nested too deep"),
    ("destination-name-with-a-line-feed", '[destinations]\n"A\\nB" = "127.0.0.1:104"\n', {},
     "destinations.A\\nB: must be an AE title"),
    # a NUL in a path (check-config "ok", then twistd "cannot start: embedded null byte",
    # no key named), in a destination's address (ok for both: the C-MOVE failed later)
    ("archive-path-with-a-nul", '[[archives]]\nname = "l"\npath = "st\\u0000ore"\n', {},
     "archives[0].path: must not hold a NUL character, got 'st\\x00ore'"),
    ("destination-with-a-nul", '[destinations]\nX = "127.0.0.1\\u0000:104"\n', {},
     "destinations.X: must not hold a NUL character"),
    # past the open-file limit: "ok", then a peer that took no connection, silently
    ("fd-reserve-past-the-open-file-limit", '[facade]\nfd_reserve = 1000000000\n', {},
     "facade.fd_reserve: must leave 256 of the open-file limit"),
    # the threads' ports may be fixed, for a firewall between sites (0: any free port)
    ("push-port-beyond-range", '[overlay]\nport = {port}\ntls_dir = "tls"\n'
     'push_port = 70000\n', {},
     "overlay.push_port: must be -1 (none), 0 (any free port) or 1-65535, got 70000"),
    ("push-port-is-the-overlays", '[overlay]\nport = {port}\ntls_dir = "tls"\n'
     'push_port = {port}\n', {}, "overlay.push_port: {port} is overlay.port too"),
    ("read-port-is-the-admins", '[overlay]\nport = {port}\ntls_dir = "tls"\n'
     'read_port = {admin_port}\npush_port = {admin_port}\n', {},
     "overlay.read_port: {admin_port} is admin.port too"),
    # fourteenth session: where a new instance's first copy goes
    ("first-copy-unknown", '[strategies]\nfirst_copy = "nearest"\n', {},
     'strategies.first_copy: must be "auto", "placement" or "local", got \'nearest\''),
    ("first-copy-slack-negative", '[strategies]\nfirst_copy_slack = -0.5\n', {},
     "strategies.first_copy_slack: must be a fraction of the mean (a number 0-100), "
     "got -0.5"),
    ("first-copy-slack-nan", '[strategies]\nfirst_copy_slack = nan\n', {},
     "strategies.first_copy_slack: must be a fraction of the mean"),
    # seventeenth session: a path that is no string (a TypeError traceback from both);
    # a bind or advertise of spaces or no address ("ok", then "Couldn't listen on  :port"
    # from twistd; an advertise no peer could dial was taken)
    ("embedded-path-not-a-string", '[[archives]]\nname = "l"\npath = 7\n', {},
     "archives.l.path: must be a directory path (a string), got 7"),
    ("embedded-path-a-table", '[[archives]]\nname = "l"\npath = {a = 1}\n', {},
     "archives.l.path: must be a directory path (a string), got {'a': 1}"),
    ("facade-bind-spaces", '[facade]\nbind = " "\n', {},
     "facade.bind: must be an IP address or a host name, got ' '"),
    ("admin-bind-no-address", 'bind = "pacs north"\n', {},     # in [admin]
     "admin.bind: must be an IP address or a host name, got 'pacs north'"),
    # adapter options: "ok", then twistd "cannot start: archive o: ... Invalid value NaN
    # (not a number)", "'ae_title' must be str, not 'list'" (it was calling_ae), "must not
    # exceed 16 characters", or a ValueError traceback (max_pdu = "big")
    ("orthanc-timeout-nan", '[[archives]]\nname = "o"\nadapter = "orthanc"\n'
     'url = "http://127.0.0.1:8042"\ntimeout = nan\n', {},
     "archives[0].timeout: must be a positive number, got nan"),
    ("dimse-calling-ae-a-list", '[[archives]]\nname = "p"\nadapter = "dimse"\n'
     'ae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\ncalling_ae = ["A"]\n', {},
     "archives.p.calling_ae: must be an AE title, got ['A']"),
    ("dimse-calling-ae-too-long", '[[archives]]\nname = "p"\nadapter = "dimse"\n'
     'ae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\ncalling_ae = "PACSP2P-NORTH-WING"\n',
     {}, "archives.p.calling_ae: must be an AE title of 1-16 characters"),
    ("dimse-host-no-address", '[[archives]]\nname = "p"\nadapter = "dimse"\n'
     'ae_title = "PACS"\nhost = "pacs north"\nport = 104\n', {},
     "archives.p.host: must be an IP address"),
    ("dimse-max-pdu-text", '[[archives]]\nname = "p"\nadapter = "dimse"\n'
     'ae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\nmax_pdu = "big"\n', {},
     "archives.p.max_pdu: must be 0 or 4096..2^31, got 'big'"),
    # a page or a pool past any use: "ok", then a crawl page of 10^9 studies held in
    # memory, a pool of 10^6 threads
    ("orthanc-page-studies-huge", '[[archives]]\nname = "o"\nadapter = "orthanc"\n'
     'url = "http://127.0.0.1:8042"\npage_studies = 1000000000\n', {},
     "archives[0].page_studies: must be an integer 1..1000, got 1000000000"),
    ("dicomweb-threads-huge", '[[archives]]\nname = "w"\nadapter = "dicomweb"\n'
     'url = "http://127.0.0.1:8042/dicom-web"\nthreads = 1000000\n', {},
     "archives[0].threads: must be an integer 1..64, got 1000000"),
    # a destination or seed whose host is no address: "ok", the C-MOVE failed at its time
    ("destination-host-no-address", '[destinations]\nWS = "pacs north:104"\n', {},
     "destinations.WS: must be \"host:port\", got 'pacs north:104'"),
    ("seed-host-no-address", '[overlay]\nport = {port}\ntls_dir = "tls"\n'
     'seeds = ["999.1.1.1:11114"]\n', {},
     "overlay.seeds[0]: must be \"host:port\", got '999.1.1.1:11114'"),
    # on a kernel filesystem: "ok", then twistd "archive l: cannot start: [Errno 2] No
    # such file or directory: '/proc/sys/objects'" (no key named)
    ("embedded-path-in-proc", '[[archives]]\nname = "l"\npath = "/proc/sys"\n', {},
     "archives.l.path: /proc/sys: on the kernel's proc filesystem"),
    ("embedded-path-in-sys", '[[archives]]\nname = "l"\npath = "/sys/kernel/pacs"\n', {},
     "archives.l.path: /sys/kernel/pacs: on the kernel's sysfs filesystem"),
    ("advertise-no-address", '[overlay]\nport = {port}\ntls_dir = "tls"\n'
     'advertise = "pacs north"\n', {},
     "overlay.advertise: must be an IP address or a host name, got 'pacs north'"),
]


CHOSEN: list = []         # the ports the last _config chose ({port}, {admin_port})


def _config(tmp_path: Path, text: str, files: dict) -> Path:
    for name, body in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(body)
    cfg = tmp_path / "peer.toml"
    port, admin_port = free_port(), free_port()
    CHOSEN[:] = [port, admin_port]
    cfg.write_text(f'[peer]\nname = "north"\ndata_dir = "data"\n'
                   f'[admin]\nport = {admin_port}\n' + _ports(text, port, admin_port))
    return cfg


def _ports(text: str, port: int, admin_port: int) -> str:
    return text.replace("{port}", str(port)).replace("{port-1}", str(port - 1)).replace(
        "{admin_port}", str(admin_port))


def _lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


@pytest.mark.parametrize("text, files, says", [b[1:] for b in BROKEN],
                         ids=[b[0] for b in BROKEN])
def test_check_config_and_twistd_refuse_with_the_same_message(tmp_path, text, files, says):
    cfg = _config(tmp_path, text, files)
    says = _ports(says, *CHOSEN)
    check = subprocess.run([str(twistd_path().parent / "pacsp2p"), "check-config",
                            "--config", str(cfg)], capture_output=True, text=True,
                           cwd=tmp_path, stdin=subprocess.DEVNULL, timeout=120)
    peer = subprocess.run([str(twistd_path()), "-n", "--pidfile=", "pacsp2p", "--config",
                           str(cfg)], capture_output=True, text=True, cwd=tmp_path,
                          stdin=subprocess.DEVNULL, timeout=120)
    assert check.returncode == 2, check.stdout + check.stderr
    assert peer.returncode != 0, peer.stdout + peer.stderr
    assert _lines(check) == _lines(peer), (check.stderr, peer.stderr)
    (line,) = _lines(check)
    assert line.startswith(f"pacsp2p: {cfg}: ") or line.startswith("pacsp2p: "), line
    assert says in line, line
    assert not (tmp_path / "data").is_dir(), "a refused peer made its data directory"


@pytest.mark.parametrize("data_dir", ["/proc/self", "/sys/kernel/pacsp2p"])
def test_a_data_dir_on_a_kernel_filesystem_is_one_line_from_both(tmp_path, data_dir):
    """Before (hostile input, seventeenth session): check-config "ok", twistd "cannot
    start: peer.data_dir: /proc/self: No such file or directory"."""
    cfg = tmp_path / "peer.toml"
    cfg.write_text(f'[peer]\nname = "north"\ndata_dir = "{data_dir}"\n'
                   f'[facade]\nport = {free_port()}\n[admin]\nport = {free_port()}\n')
    check = subprocess.run([str(twistd_path().parent / "pacsp2p"), "check-config",
                            "--config", str(cfg)], capture_output=True, text=True,
                           cwd=tmp_path, stdin=subprocess.DEVNULL, timeout=120)
    peer = subprocess.run([str(twistd_path()), "-n", "--pidfile=", "pacsp2p", "--config",
                           str(cfg)], capture_output=True, text=True, cwd=tmp_path,
                          stdin=subprocess.DEVNULL, timeout=120)
    assert check.returncode == 2 and peer.returncode != 0, (check.stdout, peer.stderr)
    assert _lines(check) == _lines(peer) == [
        f"pacsp2p: {cfg}: peer.data_dir: {data_dir}: on the kernel's "
        f"{'proc' if data_dir.startswith('/proc') else 'sysfs'} filesystem, where no file "
        "can be kept"], (check.stderr, peer.stderr)


def test_a_config_that_is_not_utf8_is_one_line_too(tmp_path):
    """A config saved in Latin-1 (or a binary file named by mistake): before, both
    printed a UnicodeDecodeError traceback."""
    cfg = tmp_path / "peer.toml"
    cfg.write_bytes(b'[peer]\nname = "north"\n# Universit\xe4tsklinik\n')
    for argv in ([str(twistd_path().parent / "pacsp2p"), "check-config", "--config",
                  str(cfg)],
                 [str(twistd_path()), "-n", "--pidfile=", "pacsp2p", "--config", str(cfg)]):
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path,
                              stdin=subprocess.DEVNULL, timeout=120)
        assert proc.returncode != 0
        assert _lines(proc) == [f"pacsp2p: {cfg}: not valid TOML: not UTF-8 (byte 0xe4 on "
                                f"line 3)"], proc.stderr


def test_check_config_passes_a_good_config_with_plugins(tmp_path):
    cfg = _config(tmp_path, f'[strategies]\nplugins = ["rank.py", "{PIN}"]\n'
                  'selection = "others-first"\n'
                  '[strategies.options.pin-modality]\nMG = "breast"\n'
                  '[[archives]]\nname = "l"\nmax_fetches = 3\n', {"rank.py": RANKER})
    check = subprocess.run([str(twistd_path().parent / "pacsp2p"), "check-config",
                            "--config", str(cfg)], capture_output=True, text=True,
                           cwd=tmp_path, stdin=subprocess.DEVNULL, timeout=120)
    assert check.returncode == 0, check.stderr
    assert "ok" in check.stdout and "others-first, pin-modality" in check.stdout, check.stdout
    assert "rendezvous/others-first/work-stealing" in check.stdout, check.stdout


def test_a_relative_embedded_path_is_relative_to_the_config_file(tmp_path):
    """``path = "store"`` names the store beside the config file, whatever directory
    twistd is started from (as data_dir does; before: the current directory's, so a
    peer started by a service manager from / kept its archive in /store)."""
    conf, elsewhere = tmp_path / "conf", tmp_path / "elsewhere"
    conf.mkdir()
    elsewhere.mkdir()
    (conf / "store").write_text("a file, not a directory")
    cfg = conf / "peer.toml"
    cfg.write_text(f'[peer]\nname = "north"\ndata_dir = "data"\n[admin]\nport = {free_port()}\n'
                   '[[archives]]\nname = "l"\npath = "store"\n')
    check = subprocess.run([str(twistd_path().parent / "pacsp2p"), "check-config",
                            "--config", str(cfg)], capture_output=True, text=True,
                           cwd=elsewhere, stdin=subprocess.DEVNULL, timeout=120)
    assert check.returncode == 2, check.stdout + check.stderr
    assert f"archives.l.path: {conf / 'store'}: not a directory" in check.stderr
