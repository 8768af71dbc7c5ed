"""litegen's dependencies, with the micro-packages pinned to litegen's own version.

Static `[project] dependencies` cannot name the workspace version, so hatchling runs this hook when it
builds litegen's metadata from the source tree; a wheel built from the sdist reads them from PKG-INFO.
"""

from __future__ import annotations

from hatchling.metadata.plugin.interface import MetadataHookInterface


class PinnedMicroPackages(MetadataHookInterface):
    def update(self, metadata: dict) -> None:
        """`requires` as written, then `name==version` for each name in `pinned`."""
        version = metadata["version"]
        pinned = [f"{name}=={version}" for name in self.config["pinned"]]
        metadata["dependencies"] = [*self.config["requires"], *pinned]
