def test_one_time_format_for_documents_and_exports() -> None:
    from hashflex.agent.core.timefmt import iso

    assert iso(None) is None
    assert iso(0.0) == "1970-01-01T00:00:00Z"
    assert iso(1.5) == "1970-01-01T00:00:01.500000Z"
    assert iso(1.5, ms=True) == "1970-01-01T00:00:01.500Z"
    assert iso(1796215609.6768904, ms=True).endswith(".676Z")
