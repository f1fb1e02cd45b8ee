"""Line-art detectors used to turn a finished illustration into sketch conditions.

Weight-compatible reimplementations of the public detectors whose checkpoints live in the hub repo
``lllyasviel/Annotators``:

* ``LineartDetector``: informative-drawings generator (``sk_model.pth`` fine, ``sk_model2.pth`` coarse);
* ``LineartAnimeDetector``: Anime2Sketch U-Net (``netG.pth``);
* ``MangaLineExtraction``: manga line extraction residual U-Net (``erika.pth``).

Importing this package is cheap: it loads no weights, opens no network connection and does not initialise
CUDA. Weights are found (``model_dir``, ``$PAINTS_UNDO_LINEART_DIR``, then the hub) on first use.
"""

from .detectors import LineartAnimeDetector, LineartDetector, MangaLineExtraction
from .loading import LINEART_DIR_ENV, LineartCheckpointError, LineartWeightsNotFoundError
from .preprocessing import (
    anime_network_size,
    combine_linearts,
    manga_network_size,
    sketch_output_size,
    to_rgb_uint8,
)

__all__ = [
    "LINEART_DIR_ENV",
    "LineartAnimeDetector",
    "LineartCheckpointError",
    "LineartDetector",
    "LineartWeightsNotFoundError",
    "MangaLineExtraction",
    "anime_network_size",
    "combine_linearts",
    "manga_network_size",
    "sketch_output_size",
    "to_rgb_uint8",
]
