import engine


def test_public_names_are_pinned() -> None:
    assert sorted(engine.__all__) == [
        "Accepted",
        "ChainMismatch",
        "Clock",
        "ConfigError",
        "Engine",
        "EngineConfig",
        "EngineError",
        "EngineHandle",
        "Outcome",
        "Rejected",
        "SettleAnswer",
        "Statistics",
        "TrioWallClock",
        "load_config",
        "tuned_gc",
    ]
    for name in engine.__all__:
        assert getattr(engine, name) is not None
