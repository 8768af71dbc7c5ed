"""litegen_sp."""

__all__: list[str] = []
