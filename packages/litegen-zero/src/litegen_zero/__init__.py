"""litegen_zero."""

__all__: list[str] = []
