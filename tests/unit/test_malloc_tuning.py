"""A peer's malloc keeps instance-sized buffers mapped (``service.tune_malloc``).

The pattern of a relayed CT image at the asker (``overlay.readclient``): four lanes (pool
threads) copy each 512 KB answer out of their reused buffers into new bytes, the main
(reactor) thread keeps a window of 8 of them and drops the oldest. With glibc's defaults the freed memory
goes back to the kernel and each new copy pays a page fault per 4 KB touched (26-35 per
image measured on this host, ~8 µs each); tuned, next to none. Run in a process of its
own (the setting is process-wide).
"""

import subprocess
import sys
import textwrap

PATTERN = textwrap.dedent("""
    import collections, queue, resource, sys, threading
    from pacsp2p.service import tune_malloc
    if sys.argv[1] == "tuned":
        assert tune_malloc()
    LANES, WINDOW = 4, 8
    q = queue.Queue(maxsize=WINDOW)

    def lane(n):
        view = memoryview(bytearray(1 << 20))
        for _ in range(n):
            q.put(bytes(view[:524288 + 1000]))
        q.put(None)

    def run(n):
        lanes = [threading.Thread(target=lane, args=(n,)) for _ in range(LANES)]
        for t in lanes:
            t.start()
        window, ended = collections.deque(), 0
        while ended < LANES:
            x = q.get()
            if x is None:
                ended += 1
                continue
            window.append(x)
            if len(window) > WINDOW:
                window.popleft()
        for t in lanes:
            t.join()

    run(50)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    run(300)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / (300 * LANES))
""")


def faults_per_image(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PATTERN, mode], capture_output=True,
                         text=True, timeout=120, check=True)
    return float(out.stdout.strip())


def test_instance_sized_copies_do_not_fault_once_tuned():
    untuned, tuned = faults_per_image("default"), faults_per_image("tuned")
    print(f"page faults per 512 KB copy: default {untuned:.1f}, tuned {tuned:.1f}")
    assert tuned < 10, (untuned, tuned)        # 128 pages are touched per copy
    assert tuned < untuned / 2, (untuned, tuned)
