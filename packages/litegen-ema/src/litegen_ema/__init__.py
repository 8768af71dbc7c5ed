"""litegen_ema."""

__all__: list[str] = []
