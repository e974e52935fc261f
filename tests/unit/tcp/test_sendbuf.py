"""The chunked send buffer behaves as one bytearray that frees its front."""

from hypothesis import given, settings
from hypothesis import strategies as st

from workers.tcp.sendbuf import CHUNK, SendBuffer

_OPS = st.lists(st.one_of(
    st.tuples(st.just("append"), st.integers(0, 3 * CHUNK)),
    st.tuples(st.just("release"), st.integers(0, 3 * CHUNK)),
    st.tuples(st.just("read"), st.integers(0, 2 ** 20), st.integers(1, 3 * CHUNK)),
), max_size=30)


@settings(max_examples=300, deadline=None)
@given(_OPS)
def test_same_octets_as_a_bytearray(ops):
    buf, model, counter = SendBuffer(), bytearray(), 0
    for op in ops:
        if op[0] == "append":
            data = bytes((counter + i) % 251 for i in range(op[1]))
            counter += op[1]
            buf.append(data)
            model += data
        elif op[0] == "release":
            buf.release(op[1])
            del model[:op[1]]
        elif model:
            offset = op[1] % len(model)
            n = min(op[2], len(model) - offset)
            got = buf.read(offset, n)
            assert type(got) is bytes and got == bytes(model[offset:offset + n])
        assert len(buf) == len(model)
    assert all(0 < len(c) <= CHUNK for c in buf.chunks)  # bounded chunks: nothing big ever moves


def test_release_of_everything_frees_the_chunks():
    buf = SendBuffer()
    buf.append(b"x" * (CHUNK + 10))
    buf.release(CHUNK)
    assert len(buf.chunks) == 1 and buf.head == 0 and buf.read(0, 10) == b"x" * 10
    buf.release(10)
    assert buf.chunks == [] and len(buf) == 0


def test_reading_a_segment_that_straddles_chunks():
    buf = SendBuffer()
    buf.append(bytes(range(256)) * (CHUNK // 256))
    buf.append(b"tail")
    buf.release(CHUNK - 2)
    assert buf.read(0, 6) == bytes([254, 255]) + b"tail"
