"""Step 3: in-between frames for each pair of keyframes, assembled blank-canvas-first.

The original ``process_video`` / ``process_video_inner``: for keyframe pair ``i`` it seeds with
``seed + i``, crops both frames to the best bucket, conditions the video model on text, CLIP-vision
(via the Resampler) and the first/last-frame latents, samples 16 frames and decodes them with the
encoder's reference features. Each segment drops its last frame; the segments are concatenated and
the whole clip is flipped in time, so the video runs from the blank canvas to the finished picture.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from .errors import InvalidInputError, OutOfMemory
from .images import ImageSource, find_best_bucket, load_image_rgb, numpy2pytorch, resize_and_center_crop
from .models import ModelManager, default_manager
from .progress import CancelFlag, ProgressCallback, ProgressEvent, RunControl
from .runtime import out_of_memory_guard

logger = logging.getLogger(__name__)

#: The original's (height, width) buckets of the video model.
DEFAULT_BUCKETS: tuple[tuple[int, int], ...] = ((320, 512), (384, 448), (448, 384), (512, 320))
DEFAULT_VIDEO_PROMPT = "1girl, masterpiece, best quality"
DEFAULT_VIDEO_SEED = 123
DEFAULT_VIDEO_STEPS = 50
DEFAULT_VIDEO_CFG = 7.5
DEFAULT_FPS = 4
FRAMES_PER_SEGMENT = 16
FRAME_STRIDE = 3  # the ``fs`` conditioning the original always passes
MAX_VIDEO_STEPS = 999


def parse_buckets(text: str | Sequence[Sequence[int]] | None) -> tuple[tuple[int, int], ...]:
    """``"320x512,384x448"`` (height x width) or pairs -> validated bucket tuple; ``None`` -> defaults."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return DEFAULT_BUCKETS
    if isinstance(text, str):
        pairs = []
        for part in text.replace(";", ",").split(","):
            part = part.strip().lower()
            if not part:
                continue
            try:
                h, w = (int(v) for v in part.split("x"))
            except ValueError:
                raise InvalidInputError(
                    f"Video bucket '{part}' is not HEIGHTxWIDTH (e.g. '320x512,384x448,448x384,512x320')."
                ) from None
            pairs.append((h, w))
    else:
        pairs = [(int(h), int(w)) for h, w in text]
    if not pairs:
        raise InvalidInputError("Give at least one video bucket (HEIGHTxWIDTH).")
    for h, w in pairs:
        if h < 16 or w < 16 or h % 8 or w % 8 or h * w > 2048 * 2048:
            raise InvalidInputError(f"Video bucket {h}x{w} must be multiples of 8 between 16 and 2048.")
    return tuple(pairs)


def check_buckets_fit(buckets: Sequence[tuple[int, int]], unet: torch.nn.Module) -> None:
    """Each side must survive the VAE (/8) and every UNet downsampling: multiples of 8 * 2**(levels - 1)."""
    levels = len(getattr(unet, "config", {}).get("channel_mult", [1, 1, 1, 1]))
    multiple = 8 * 2 ** (levels - 1)
    bad = [f"{h}x{w}" for h, w in buckets if h % multiple or w % multiple]
    if bad:
        raise InvalidInputError(f"Video buckets {', '.join(bad)} do not fit this model: use multiples of {multiple}.")


@dataclass
class VideoSegment:
    """Frames of one keyframe pair, ready to show: uint8 (15, h, w, 3) in final (blank-first) order.

    ``position`` is the segment's place in the final video (0 = the blank-canvas end).
    """

    index: int
    count: int
    frames: np.ndarray
    cropped: tuple[np.ndarray, np.ndarray]
    bucket: tuple[int, int]

    @property
    def position(self) -> int:
        return self.count - 1 - self.index


@dataclass
class VideoResult:
    """The whole clip, blank canvas first: uint8 (T, h, w, 3) with T = 15 * (keyframes - 1)."""

    frames: np.ndarray
    segments: list[VideoSegment] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def cropped_first_keyframe(self) -> np.ndarray:
        return self.segments[0].cropped[0]


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """(1, 3, t, h, w) in [-1, 1] -> uint8 (t, h, w, 3), truncating as the original's video writer."""
    x = torch.clamp(video.float(), -1.0, 1.0) * 127.5 + 127.5
    return x.detach().cpu().to(torch.uint8)[0].permute(1, 2, 3, 0).numpy()


def _validate(keyframes: Sequence[Any], steps: Any, cfg: Any, seed: Any) -> tuple[int, float, int]:
    if keyframes is None or len(keyframes) < 2:
        raise InvalidInputError("A video needs at least two keyframes.")
    try:
        steps_i, cfg_f, seed_i = int(steps), float(cfg), int(seed)
    except (TypeError, ValueError):
        raise InvalidInputError("Video steps and seed must be whole numbers and CFG a number.") from None
    if steps_i < 1 or steps_i > MAX_VIDEO_STEPS:
        raise InvalidInputError(f"Video steps must be between 1 and {MAX_VIDEO_STEPS}, got {steps_i}.")
    if not math.isfinite(cfg_f) or cfg_f <= 0:
        raise InvalidInputError(f"CFG scale must be a positive number, got {cfg}.")
    if seed_i < 0 or seed_i + len(keyframes) >= 2**63:
        raise InvalidInputError(f"The seed must be between 0 and 2**63 - 1, got {seed_i}.")
    return steps_i, cfg_f, seed_i


def load_keyframe(item: Any) -> np.ndarray:
    """A keyframe as uint8 RGB: arrays, PIL images, paths, or Gradio gallery ``(path, caption)`` items."""
    if isinstance(item, (tuple, list)) and item and not isinstance(item, np.ndarray):
        item = item[0]
    if isinstance(item, dict):  # gradio FileData-like
        item = item.get("path") or item.get("name") or item.get("image")
    return load_image_rgb(item)


class _ConditionCache:
    """Text and negative-image conditions reused across the segments of one run (same inputs, same values)."""

    def __init__(self) -> None:
        self.text: dict[str, torch.Tensor] = {}
        self.negative_image: dict[tuple[int, int], torch.Tensor] = {}


@dataclass
class _PairConditions:
    """What the video model is conditioned on for one keyframe pair (one segment)."""

    cropped: tuple[np.ndarray, np.ndarray]
    positive_image: torch.Tensor  # (1, 2, tokens, d) after the Resampler
    negative_image: torch.Tensor
    concat: torch.Tensor  # (1, 4, 16, h, w): first and last latent, zeros between
    vae_hidden_states: list[torch.Tensor]  # where ``MemoryManager.condition_device`` says, until the decode
    seed: int


def _text_conditions(prompt: str, models: ModelManager, cache: _ConditionCache) -> tuple[torch.Tensor, torch.Tensor]:
    pipe = models.multi_frame().pipeline
    if prompt not in cache.text or "" not in cache.text:
        models.memory.load_models_to_gpu(pipe.text_encoder)
        cache.text[prompt] = pipe.encode_cropped_prompt_77tokens(prompt)
        cache.text[""] = pipe.encode_cropped_prompt_77tokens("")
    return cache.text[prompt], cache.text[""]


def condition_pairs(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    seeds: Sequence[int],
    *,
    models: ModelManager,
    buckets: Sequence[tuple[int, int]] = DEFAULT_BUCKETS,
    control: Optional[RunControl] = None,
    cache: Optional[_ConditionCache] = None,
) -> list[_PairConditions]:
    """Crop each keyframe pair to its bucket and encode it: CLIP-vision tokens through the Resampler,
    then the VAE latents and encoder features of both frames.

    Stage by stage over all pairs (the image encoder for every pair, then the VAE for every pair), so
    that with one stage resident at a time each model moves to the GPU once per run, not once per
    segment; the values do not depend on the order.
    """
    control = control or RunControl()
    cache = cache or _ConditionCache()
    memory = models.memory
    pipe = models.multi_frame().pipeline
    cropped, inputs = [], []
    for image_1, image_2 in pairs:
        target_height, target_width = find_best_bucket(image_1.shape[0], image_1.shape[1], options=buckets)
        image_1 = resize_and_center_crop(image_1, target_width=target_width, target_height=target_height)
        image_2 = resize_and_center_crop(image_2, target_width=target_width, target_height=target_height)
        cropped.append((image_1, image_2))
        inputs.append(numpy2pytorch([image_1, image_2]).unsqueeze(0).movedim(1, 2))  # (1, 3, 2, h, w)

    memory.load_models_to_gpu([pipe.image_projection, pipe.image_encoder])
    positive_images, negative_images = [], []
    for input_frames in inputs:
        frames = input_frames.to(device=pipe.image_encoder.device, dtype=pipe.image_encoder.dtype)
        positive_images.append(pipe.image_projection(pipe.encode_clip_vision(frames)))
        key = tuple(frames.shape[-2:])
        if key not in cache.negative_image:
            cache.negative_image[key] = pipe.image_projection(pipe.encode_clip_vision(torch.zeros_like(frames)))
        negative_images.append(cache.negative_image[key])
        control.check()

    memory.load_models_to_gpu([pipe.vae])
    conditions = []
    for pair, input_frames, positive, negative, seed in zip(cropped, inputs, positive_images, negative_images, seeds):
        frames = input_frames.to(device=pipe.vae.device, dtype=pipe.vae.dtype)
        latents_2, hidden_states = pipe.encode_latents(frames, return_hidden_states=True)
        first, last = latents_2[:, :, 0], latents_2[:, :, 1]
        concat = torch.stack([first] + [torch.zeros_like(first)] * (FRAMES_PER_SEGMENT - 2) + [last], dim=2)
        hidden_states = [h.to(memory.condition_device) for h in hidden_states]
        conditions.append(_PairConditions(pair, positive, negative, concat, hidden_states, seed))
        control.check()
    return conditions


def sample_segments(
    conditions: Sequence[_PairConditions],
    text: tuple[torch.Tensor, torch.Tensor],
    steps: int,
    cfg: float,
    *,
    models: ModelManager,
    fs: int = FRAME_STRIDE,
    control: Optional[RunControl] = None,
    segments: Sequence[int] = (0,),
    count: int = 1,
) -> list[tuple[torch.Tensor, np.ndarray, np.ndarray]]:
    """Sample and decode the segments of ``conditions`` (one bucket) as one batch.

    Each segment draws its noise from its own seed's generator, so each gets the result its own
    run gets: the math is per clip. Returns per segment its frames (1, 3, 16, h, w) and both
    cropped keyframes.
    """
    control = control or RunControl()
    memory = models.memory
    pipe = models.multi_frame().pipeline
    if len({c.concat.shape for c in conditions}) != 1:
        raise ValueError("Keyframe pairs sampled together must share a bucket.")
    sampling_and_decoding = [pipe.unet, pipe.vae] if memory.video_unet_and_vae_together else [pipe.unet]
    memory.load_models_to_gpu(sampling_and_decoding)
    # The original seeded the global RNGs with ``seed`` and the sampler drew from them; a private
    # generator seeded the same way on the same device gives the same numbers, thread-safely.
    generators = [torch.Generator(device=pipe.unet.device).manual_seed(c.seed) for c in conditions]
    together = tuple(segments) if len(segments) > 1 else ()
    control.report(ProgressEvent("video", 0, steps, segments[0], count, together))
    positive_text, negative_text = text
    latents = pipe(
        batch_size=1,
        steps=steps,
        guidance_scale=cfg,
        positive_text_cond=positive_text,
        negative_text_cond=negative_text,
        positive_image_cond=torch.cat([c.positive_image for c in conditions]),
        negative_image_cond=torch.cat([c.negative_image for c in conditions]),
        concat_cond=torch.cat([c.concat for c in conditions]),
        fs=fs,
        progress_tqdm=control.progress_tqdm,
        callback=control.sampler_callback("video", steps, segments[0], count, together),
        generator=generators[0] if len(generators) == 1 else generators,
        batch_cfg=models.use_batch_cfg,
    )
    memory.load_models_to_gpu(sampling_and_decoding if memory.video_unet_and_vae_together else [pipe.vae])
    return [(pipe.decode_latents(latents[i:i + 1], c.vae_hidden_states), *c.cropped) for i, c in enumerate(conditions)]


def _segment_groups(images: Sequence[np.ndarray], pending: Sequence[int], size: int,
                    buckets: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Pending segments in order, in runs of up to ``size`` that share a bucket (sampled together)."""
    groups: list[list[int]] = []
    previous_bucket = None
    for i in pending:
        bucket = find_best_bucket(images[i].shape[0], images[i].shape[1], options=buckets)
        if groups and len(groups[-1]) < size and bucket == previous_bucket:
            groups[-1].append(i)
        else:
            groups.append([i])
        previous_bucket = bucket
    return groups


def iter_video_segments(
    keyframes: Sequence[ImageSource],
    prompt: str = DEFAULT_VIDEO_PROMPT,
    steps: int = DEFAULT_VIDEO_STEPS,
    cfg: float = DEFAULT_VIDEO_CFG,
    seed: int = DEFAULT_VIDEO_SEED,
    *,
    buckets: Sequence[Sequence[int]] | str | None = DEFAULT_BUCKETS,
    models: Optional[ModelManager] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: CancelFlag = None,
    skip: Sequence[int] = (),
) -> Iterator[VideoSegment]:
    """Yield each keyframe pair's frames as soon as they are made (for streaming previews).

    Segments come in processing order (pair 0 first), which is the *end* of the final video;
    ``segment.position`` says where each one goes. ``skip`` lists segment indices not to compute
    (the caller already has them, e.g. when resuming). Where the memory manager allows it (high
    mode on a GPU by default; ``ModelManager.segment_batch`` caps it), several segments are sampled
    as one batch and come together.
    """
    steps, cfg, seed = _validate(keyframes, steps, cfg, seed)
    buckets = parse_buckets(buckets)
    images = [load_keyframe(k) for k in keyframes]
    prompt = "" if prompt is None else str(prompt)
    models = models or default_manager()
    control = RunControl(progress, cancel)
    cache = _ConditionCache()
    check_buckets_fit(buckets, models.multi_frame().pipeline.unet)
    count = len(images) - 1
    pending = [i for i in range(count) if i not in skip]
    if not pending:
        return
    with out_of_memory_guard(models), torch.inference_mode():
        text = _text_conditions(prompt, models, cache)
        control.check()
        conditions = dict(zip(pending, condition_pairs([(images[i], images[i + 1]) for i in pending],
                                                       [seed + i for i in pending], models=models, buckets=buckets,
                                                       control=control, cache=cache)))
    queue = _segment_groups(images, pending, models.video_segment_batch, buckets)
    while queue:
        group = queue.pop(0)
        control.check()
        try:
            with out_of_memory_guard(models), torch.inference_mode():
                results = sample_segments([conditions[i] for i in group], text, steps, cfg, models=models,
                                          control=control, segments=group, count=count)
                made = [(i, to_uint8_frames(video[:, :, :-1])[::-1].copy(), c1, c2)
                        for i, (video, c1, c2) in zip(group, results)]
        except OutOfMemory:
            if len(group) == 1:
                raise
            # The same segments one at a time, and no batches for the rest of this run.
            logger.warning("Sampling %d video segments together ran out of memory; going on one at a time.",
                           len(group))
            queue = [[i] for i in group] + [[i] for rest in queue for i in rest]
            continue
        for i, frames, c1, c2 in made:
            del conditions[i]
            yield VideoSegment(index=i, count=count, frames=frames, cropped=(c1, c2), bucket=tuple(c1.shape[:2]))


def assemble_video(segments: Sequence[VideoSegment]) -> np.ndarray:
    """Concatenate segments in final order (blank canvas first)."""
    ordered = sorted(segments, key=lambda s: s.position)
    return np.concatenate([s.frames for s in ordered], axis=0)


def generate_video(
    keyframes: Sequence[ImageSource],
    prompt: str = DEFAULT_VIDEO_PROMPT,
    steps: int = DEFAULT_VIDEO_STEPS,
    cfg: float = DEFAULT_VIDEO_CFG,
    seed: int = DEFAULT_VIDEO_SEED,
    *,
    buckets: Sequence[Sequence[int]] | str | None = DEFAULT_BUCKETS,
    models: Optional[ModelManager] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: CancelFlag = None,
) -> VideoResult:
    """The original ``process_video``: all segments, assembled blank-canvas-first, as uint8 frames."""
    segments = list(iter_video_segments(keyframes, prompt, steps, cfg, seed, buckets=buckets, models=models,
                                        progress=progress, cancel=cancel))
    settings = dict(prompt=prompt, steps=int(steps), cfg=float(cfg), seed=int(seed),
                    buckets=[list(b) for b in parse_buckets(buckets)], frames_per_segment=FRAMES_PER_SEGMENT)
    return VideoResult(frames=assemble_video(segments), segments=segments, settings=settings)
