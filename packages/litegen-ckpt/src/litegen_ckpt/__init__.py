"""litegen_ckpt."""

__all__: list[str] = []
