"""The names the stack's resolver learned, shared between worker processes through the run directory."""

from workers.attach.learned import SharedNames

A, B = bytes([192, 0, 2, 10]), bytes([192, 0, 2, 20])


def test_an_answer_learned_in_one_process_is_seen_by_another_once_flushed(tmp_path):
    udp, tcp = SharedNames(str(tmp_path), "udp.1"), SharedNames(str(tmp_path), "tcp.1")
    assert tcp.names_of(A, 0.0) == []
    udp.learn("idx.test", [A], ttl=60, now=0.0)
    assert udp.names_of(A, 0.0) == ["idx.test"] and tcp.names_of(A, 0.0) == []  # not flushed yet
    udp.flush()
    assert tcp.names_of(A, 1.0) == ["idx.test"]
    # A second answer written right after (the same tick of the file clock) is seen too.
    udp.learn("other.test", [B], ttl=60, now=1.0)
    udp.flush()
    assert tcp.names_of(B, 1.0) == ["other.test"]
    tcp.learn("idx.test", [B], ttl=60, now=1.0)
    assert tcp.names_of(B, 1.0) == ["idx.test", "other.test"]
    udp.close()
    assert tcp.names_of(B, 2.0) == ["idx.test"] and not (tmp_path / "names-udp.1.msgpack").exists()


def test_a_damaged_file_counts_as_empty(tmp_path):
    (tmp_path / "names-junk.msgpack").write_bytes(b"\xc1not msgpack")
    (tmp_path / "names-list.msgpack").write_bytes(b"\x93\x01\x02\x03")
    assert SharedNames(str(tmp_path), "icmp.1").names_of(A, 0.0) == []
