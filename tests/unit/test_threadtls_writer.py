"""The read port's writer (``threadtls._Writer``): what it gathers and what it sends as it is.

An answer's head and small pieces (a batch's frames) go out gathered in its reused
buffer; a piece larger than the buffer (a CT image's 512 KB) is handed to ``sendall`` as
it is, after what was gathered, never copied into the buffer first (before: its first
256 KB were copied there, a memmove with the GIL held per image).
"""

from pacsp2p.overlay import threadtls


class _Socket:
    def __init__(self):
        self.calls = []

    def sendall(self, data):
        self.calls.append((data, bytes(data)))


def test_a_large_piece_is_sent_as_it_is_after_the_gathered_head():
    sock = _Socket()
    out = threadtls._Writer(sock)
    head, body = b"HTTP/1.1 200 OK\r\ncontent-length: 524288\r\n\r\n", bytes(range(256)) * 2048
    out.write(head)
    out.write(body)
    out.flush()
    assert b"".join(sent for _, sent in sock.calls) == head + body
    assert [sent for _, sent in sock.calls] == [head, body]
    assert sock.calls[1][0] is body                     # the caller's bytes, not a copy


def test_small_pieces_are_gathered_into_one_write():
    sock = _Socket()
    out = threadtls._Writer(sock)
    pieces = [bytes([i]) * 1000 for i in range(100)]
    for p in pieces:
        out.write(p)
    out.flush()
    assert [sent for _, sent in sock.calls] == [b"".join(pieces)]


def test_pieces_past_the_buffer_keep_their_order():
    sock = _Socket()
    out = threadtls._Writer(sock)
    pieces = [bytes([i]) * (60 << 10) for i in range(20)] + [b"x" * (300 << 10), b"tail"]
    for p in pieces:
        out.write(p)
    out.flush()
    assert b"".join(sent for _, sent in sock.calls) == b"".join(pieces)
    assert all(len(sent) <= threadtls.OUT or data is pieces[-2] for data, sent in sock.calls)
