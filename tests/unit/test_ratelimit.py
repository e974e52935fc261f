from pipeline.ratelimit import TokenBucket


def test_bucket_allows_burst_then_rate():
    b = TokenBucket(rate=10, burst=3)
    assert [b.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert b.take(0.05) is False
    assert b.take(0.1) is True
    assert [b.take(10.0) for _ in range(4)] == [True, True, True, False]
