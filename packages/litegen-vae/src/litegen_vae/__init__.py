"""litegen_vae."""

__all__: list[str] = []
