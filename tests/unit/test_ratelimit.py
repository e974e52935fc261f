from workers.ratelimit import TokenBucket


def test_bucket_allows_burst_then_rate():
    b = TokenBucket(rate=10, burst=3)
    assert [b.allow(0.0) for _ in range(4)] == [True, True, True, False]
    assert b.allow(0.05) is False
    assert b.allow(0.1) is True
    assert [b.allow(10.0) for _ in range(4)] == [True, True, True, False]
