"""Model manager: hub id or local folder -> loaded components, lazily and once.

Each model family comes from a local models folder (``--models-dir`` or ``$PAINTS_UNDO_MODELS_DIR``,
holding ``paints_undo_single_frame/``, ``paints_undo_multi_frame/`` and optionally the tagger files)
or from its hub repository through huggingface_hub's cache (``HF_ENDPOINT``, ``HF_HOME`` and
``HF_HUB_OFFLINE`` are honoured; downloads show progress bars). Nothing is loaded until a stage
needs it; when files are missing, one message says which and how to provide them.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from memory_management import MemoryManager

from .errors import ModelLoadError, ModelsNotAvailableError

logger = logging.getLogger(__name__)

DEFAULT_SINGLE_FRAME_REPO = "lllyasviel/paints_undo_single_frame"
DEFAULT_MULTI_FRAME_REPO = "lllyasviel/paints_undo_multi_frame"
DEFAULT_TAGGER_REPO = "lllyasviel/misc"
MODELS_DIR_ENV = "PAINTS_UNDO_MODELS_DIR"
TAGGER_FILES = ("wd-v1-4-moat-tagger-v2.onnx", "wd-v1-4-moat-tagger-v2.csv")
LINEART_FILES = ("sk_model.pth", "sk_model2.pth", "netG.pth", "erika.pth")
LINEART_REPO = "lllyasviel/Annotators"

FAMILIES = {
    "single_frame": ("paints_undo_single_frame", DEFAULT_SINGLE_FRAME_REPO, "single-frame (keyframe) model"),
    "multi_frame": ("paints_undo_multi_frame", DEFAULT_MULTI_FRAME_REPO, "multi-frame (video) model"),
}


@dataclass(frozen=True)
class ModelOrigin:
    """Where a model family was loaded from (recorded in each run's settings sidecar)."""

    repo: str
    folder: str
    revision: Optional[str] = None


@dataclass(frozen=True)
class ModelSources:
    """Where to find each model family."""

    models_dir: Optional[Path] = None
    single_frame_repo: str = DEFAULT_SINGLE_FRAME_REPO
    multi_frame_repo: str = DEFAULT_MULTI_FRAME_REPO
    revision: Optional[str] = None
    token: Optional[str] = None

    @classmethod
    def from_env(cls, models_dir: Optional[str | os.PathLike] = None, **kwargs: Any) -> "ModelSources":
        """``models_dir`` if given, else ``$PAINTS_UNDO_MODELS_DIR`` if set."""
        chosen = models_dir if models_dir is not None else os.environ.get(MODELS_DIR_ENV) or None
        return cls(models_dir=Path(chosen).expanduser() if chosen else None, **kwargs)

    def repo_for(self, family: str) -> str:
        return self.single_frame_repo if family == "single_frame" else self.multi_frame_repo

    def local_folder(self, family: str) -> Optional[Path]:
        if self.models_dir is None:
            return None
        folder = self.models_dir / FAMILIES[family][0]
        return folder if folder.is_dir() else None

    def tagger_dir(self) -> Optional[Path]:
        if self.models_dir is not None and all((self.models_dir / f).is_file() for f in TAGGER_FILES):
            return self.models_dir
        return None

    def how_to_provide(self, family: str) -> str:
        dirname, repo_default, _ = FAMILIES[family]
        repo = self.repo_for(family)
        where = (
            f"put the files of '{repo}' into '{self.models_dir / dirname}'"
            if self.models_dir is not None
            else f"pass --models-dir (or set {MODELS_DIR_ENV}) to a folder holding '{dirname}/'"
        )
        online = "allow downloads (unset HF_HUB_OFFLINE)" if _offline() else f"check the connection to the hub for '{repo}'"
        return f"{where}, or {online}"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@dataclass
class SingleFrameModels:
    tokenizer: Any
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    sampler: Any
    origin: ModelOrigin

    def modules(self) -> list[torch.nn.Module]:
        return [self.text_encoder, self.vae, self.unet]


@dataclass
class MultiFrameModels:
    pipeline: Any  # diffusers_vdm.LatentVideoDiffusionPipeline
    origin: ModelOrigin

    def modules(self) -> list[torch.nn.Module]:
        return self.pipeline.modules()


@dataclass
class ModelManager:
    """Loads each model family on first use and keeps it (the process's model cache).

    ``memory`` decides devices, dtypes and offloading; it is created on first use too, so building a
    manager touches no GPU.
    """

    sources: ModelSources = field(default_factory=ModelSources.from_env)
    device: Optional[str] = None
    vram_mode: Optional[str] = None
    #: Both guidance branches in one UNet batch; ``None`` = the memory manager's default for the device.
    batch_cfg: Optional[bool] = None
    #: ``torch.compile`` the two UNets (opt-in; the first run pays the compilation).
    compile: bool = False
    #: Replay the video UNet as a CUDA graph (opt-in, CUDA only; meant for the high VRAM mode, where
    #: the weights never move). Exact, but no faster on an H100, where the eager UNet is GPU-bound.
    cuda_graphs: bool = False
    #: Run the video UNet channels-last (same math; see ``UNet3DModel.set_channels_last``); ``None`` =
    #: the memory manager's default (on for CUDA GPUs from Volta on).
    channels_last: Optional[bool] = None
    #: Most video segments to sample as one batch (the same math per segment); ``None`` = as many as
    #: the memory holds in high mode on a GPU, else one. The memory manager caps it
    #: (``MemoryManager.video_segment_batch``); see ``video_segment_batch``.
    segment_batch: Optional[int] = None
    #: Run the video UNet's group norms + SiLU and feed-forward gates as one-pass Triton kernels
    #: (opt-in; see ``UNet3DModel.set_fused_kernels``). Without Triton or a CUDA GPU it changes nothing.
    fused_kernels: bool = False
    _memory: Optional[MemoryManager] = None
    _single: Optional[SingleFrameModels] = None
    _multi: Optional[MultiFrameModels] = None
    _lineart: dict = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock)

    @property
    def memory(self) -> MemoryManager:
        with self._lock:
            if self._memory is None:
                self._memory = MemoryManager.create(self.device, self.vram_mode)
            return self._memory

    @property
    def use_batch_cfg(self) -> bool:
        return self.memory.batch_cfg_default if self.batch_cfg is None else bool(self.batch_cfg)

    @property
    def video_segment_batch(self) -> int:
        """Video segments sampled together: ``segment_batch`` as far as the VRAM mode allows."""
        return self.memory.video_segment_batch(self.segment_batch)

    @property
    def use_channels_last(self) -> bool:
        return self.memory.video_unet_channels_last if self.channels_last is None else bool(self.channels_last)

    @property
    def use_fused_kernels(self) -> bool:
        """``fused_kernels`` where they can run (a warning says why not, where they cannot)."""
        if not self.fused_kernels:
            return False
        reason = self.memory.fused_kernels_unavailable_reason()
        if reason:
            logger.warning("--fused-kernels is ignored: %s; the PyTorch kernels run instead.", reason)
            return False
        return True

    @property
    def use_cuda_graphs(self) -> bool:
        return bool(self.cuda_graphs) and self.memory.device.type == "cuda"

    # -- resolution -------------------------------------------------------------------------------

    def resolve(self, family: str, local_files_only: Optional[bool] = None) -> ModelOrigin:
        """Folder of ``family``: the local models folder if it has it, else the hub cache (downloading)."""
        from diffusers_vdm.loading import ModelFilesNotFoundError, resolve_model_folder

        local = self.sources.local_folder(family)
        if local is not None:
            return ModelOrigin(repo=str(local), folder=str(local))
        repo = self.sources.repo_for(family)
        try:
            folder = resolve_model_folder(repo, revision=self.sources.revision, token=self.sources.token,
                                          local_files_only=local_files_only)
        except ModelFilesNotFoundError as exc:
            label = FAMILIES[family][2]
            raise ModelsNotAvailableError(
                f"The {label} is not available: {self.sources.how_to_provide(family)}."
            ) from exc
        revision = folder.name if folder.parent.name == "snapshots" else None
        return ModelOrigin(repo=repo, folder=str(folder), revision=revision)

    def missing_models(self) -> dict[str, str]:
        """``{family: how to provide it}`` for what cannot be used now; downloads and loads nothing.

        A family that is neither local nor cached counts as missing only when downloads are off
        (``HF_HUB_OFFLINE``); otherwise it will be downloaded on first use.
        """
        missing: dict[str, str] = {}
        for family in FAMILIES:
            try:
                self.resolve(family, local_files_only=True)
            except ModelsNotAvailableError:
                if _offline():
                    missing[family] = f"The {FAMILIES[family][2]} is missing: {self.sources.how_to_provide(family)}."
        tagger_problem = self._tagger_problem()
        if tagger_problem:
            missing["tagger"] = tagger_problem
        lineart_problem = self._lineart_problem()
        if lineart_problem:
            missing["lineart"] = lineart_problem
        return missing

    def _lineart_problem(self) -> Optional[str]:
        """Line-art files that are neither local nor cached while downloads are off (sketch tab only)."""
        import lineart_models
        from huggingface_hub import try_to_load_from_cache

        folders = [self.sources.models_dir, os.environ.get(lineart_models.LINEART_DIR_ENV)]
        absent = [
            name for name in LINEART_FILES
            if not any(f and (Path(f) / name).is_file() for f in folders)
            and not isinstance(try_to_load_from_cache(LINEART_REPO, name), str)
        ]
        if not absent or not _offline():
            return None
        where = f"'{self.sources.models_dir}'" if self.sources.models_dir else "the models folder (--models-dir)"
        return (f"Line-art weights {', '.join(absent)} are missing (needed by the sketch tools only): put them into "
                f"{where}, or allow downloads from '{LINEART_REPO}' (unset HF_HUB_OFFLINE).")

    def _tagger_problem(self) -> Optional[str]:
        import wd14_tagger

        folder = self.sources.tagger_dir() or os.environ.get(wd14_tagger.MODEL_DIR_ENV) or None
        if folder is not None:
            try:
                wd14_tagger.resolve_model_files(folder)
                return None
            except wd14_tagger.TaggerUnavailableError as exc:
                return str(exc)
        from huggingface_hub import try_to_load_from_cache

        cached = all(isinstance(try_to_load_from_cache(DEFAULT_TAGGER_REPO, name), str) for name in TAGGER_FILES)
        if cached or not _offline():
            return None
        where = f"'{self.sources.models_dir}'" if self.sources.models_dir else "the models folder (--models-dir)"
        return (f"The WD14 tagger is missing: put {' and '.join(TAGGER_FILES)} into {where}, "
                f"or allow downloads from '{DEFAULT_TAGGER_REPO}' (unset HF_HUB_OFFLINE).")

    # -- loading ----------------------------------------------------------------------------------

    def single_frame(self) -> SingleFrameModels:
        with self._lock:
            if self._single is None:
                self._single = self._load_single_frame()
            return self._single

    def multi_frame(self) -> MultiFrameModels:
        with self._lock:
            if self._multi is None:
                self._multi = self._load_multi_frame()
            return self._multi

    def _load_single_frame(self) -> SingleFrameModels:
        from diffusers import AutoencoderKL
        from diffusers.models.attention_processor import AttnProcessor2_0
        from transformers import CLIPTextModel, CLIPTokenizer

        from diffusers_vdm.loading import IncompatibleCheckpointError, ModelFilesNotFoundError, load_transformers_model
        from single_frame import KDiffusionSampler, ModifiedUNet

        origin = self.resolve("single_frame")
        folder = Path(origin.folder)
        dtype = self.memory.dtype_for
        logger.info("Loading the single-frame model from %s", folder)
        try:
            tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
            text_encoder = load_transformers_model(CLIPTextModel, folder / "text_encoder", dtype("sf_text_encoder"))
            vae, info = AutoencoderKL.from_pretrained(str(folder), subfolder="vae", torch_dtype=dtype("sf_vae"),
                                                      output_loading_info=True)
            problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
            if problems:
                raise IncompatibleCheckpointError(f"Weights in '{folder / 'vae'}' do not fit AutoencoderKL: {problems}.")
            unet = ModifiedUNet.from_pretrained(str(folder), subfolder="unet", torch_dtype=dtype("sf_unet"))
        except (ModelFilesNotFoundError, OSError) as exc:
            raise ModelsNotAvailableError(
                f"The single-frame model in '{folder}' is incomplete ({exc}); "
                f"{self.sources.how_to_provide('single_frame')}."
            ) from exc
        except (IncompatibleCheckpointError, RuntimeError, ValueError) as exc:
            raise ModelLoadError(f"The single-frame model in '{folder}' does not load: {exc}") from exc
        for module in (text_encoder, vae, unet):
            module.eval().requires_grad_(False)
        unet.set_attn_processor(AttnProcessor2_0())
        vae.set_attn_processor(AttnProcessor2_0())
        if self.compile:
            unet.compile()
        sampler = KDiffusionSampler(unet=unet, timesteps=1000, linear_start=0.00085, linear_end=0.020, linear=True,
                                    batched_cfg=self.use_batch_cfg)
        return SingleFrameModels(tokenizer, text_encoder, vae, unet, sampler, origin)

    def _load_multi_frame(self) -> MultiFrameModels:
        from diffusers_vdm import LatentVideoDiffusionPipeline
        from diffusers_vdm.loading import IncompatibleCheckpointError, ModelFilesNotFoundError

        origin = self.resolve("multi_frame")
        dtype = self.memory.dtype_for
        dtypes = {
            "text_encoder": dtype("mf_text_encoder"),
            "image_encoder": dtype("mf_image_encoder"),
            "vae": dtype("mf_vae"),
            "image_projection": dtype("mf_image_projection"),
            "unet": dtype("mf_unet"),
        }
        try:
            pipeline = LatentVideoDiffusionPipeline.from_pretrained(origin.folder, dtype=dtypes)
        except ModelFilesNotFoundError as exc:
            raise ModelsNotAvailableError(
                f"The multi-frame model in '{origin.folder}' is incomplete ({exc}); "
                f"{self.sources.how_to_provide('multi_frame')}."
            ) from exc
        except (IncompatibleCheckpointError, OSError, RuntimeError, ValueError) as exc:
            raise ModelLoadError(f"The multi-frame model in '{origin.folder}' does not load: {exc}") from exc
        self.apply_memory_settings(pipeline)
        if self.compile:
            pipeline.unet.compile()
        return MultiFrameModels(pipeline, origin)

    def apply_memory_settings(self, pipeline) -> None:
        """VRAM-mode and layout switches of the video model that change memory or speed, never results."""
        pipeline.vae.set_decoder_frame_chunk(self.memory.vae_decode_frame_chunk)
        pipeline.vae.set_decoder_band_bytes(self.memory.vae_decode_band_bytes)
        pipeline.unet.set_attention_batch_chunk(self.memory.unet_attention_batch_chunk)
        if pipeline.unet.channels_last != self.use_channels_last:
            pipeline.unet.set_channels_last(self.use_channels_last)
        if pipeline.unet.fused_kernels != self.use_fused_kernels:
            pipeline.unet.set_fused_kernels(self.use_fused_kernels)
        pipeline.set_cuda_graphs(self.use_cuda_graphs)

    # -- line art ---------------------------------------------------------------------------------

    def lineart(self, detector: str):
        """A ``lineart_models`` detector by class name, created once; its weights load on first call.

        Weights come from the models folder when it holds the public file names (``sk_model.pth``,
        ``sk_model2.pth``, ``netG.pth``, ``erika.pth``), else from ``$PAINTS_UNDO_LINEART_DIR`` or the
        ``lllyasviel/Annotators`` hub repository.
        """
        import lineart_models

        with self._lock:
            if detector not in self._lineart:
                cls = getattr(lineart_models, detector)
                model_dir = self.sources.models_dir if self.sources.models_dir and any(
                    (self.sources.models_dir / name).is_file() for name in LINEART_FILES) else None
                self._lineart[detector] = cls(model_dir=model_dir, device=self.memory.device)
            return self._lineart[detector]

    # -- tagger -----------------------------------------------------------------------------------

    def tag(self, image: Any, threshold: float = 0.35, character_threshold: float = 0.85, exclude_tags: str = "") -> str:
        """WD14 tags of ``image`` as a prompt (files from the models folder, the tagger env var, or the hub)."""
        import wd14_tagger

        try:
            return wd14_tagger.default_interrogator(image, threshold=threshold, character_threshold=character_threshold,
                                                    exclude_tags=exclude_tags, model_dir=self.sources.tagger_dir())
        except wd14_tagger.TaggerUnavailableError as exc:
            raise ModelsNotAvailableError(str(exc)) from exc

    # -- memory -----------------------------------------------------------------------------------

    def unload_all(self) -> None:
        """Move every loaded model back to the CPU (frees accelerator memory, keeps the cache)."""
        modules = []
        if self._single is not None:
            modules += self._single.modules()
        if self._multi is not None:
            modules += self._multi.modules()
        if modules or self._memory is not None:
            self.memory.unload_all_models(modules)
        for detector in self._lineart.values():
            detector.unload()


_default_manager: Optional[ModelManager] = None
_default_lock = threading.Lock()


def default_manager() -> ModelManager:
    """The process-wide model cache used when callers pass no ``models=`` (created on first use)."""
    global _default_manager
    with _default_lock:
        if _default_manager is None:
            _default_manager = ModelManager()
        return _default_manager
