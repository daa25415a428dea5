"""diffusers FLUX and SD3 transformers: loading, and one denoising forward on a token shard.

Qwen-Image and Wan 2.x load and run through the same functions; their own code is in
qwen_image.py, wan.py and families.py (docs/families.md).

``load_transformer(source, dtype, device)`` accepts

- a diffusers folder (``config.json`` + safetensors, sharded or not; a pipeline folder with a
  ``transformer/`` subfolder works too),
- a single ``.safetensors`` file in the BFL FLUX layout (with or without ComfyUI's
  ``model.diffusion_model.`` prefix), the SD3 single-file layout, or diffusers' own key names,
- ``random:PRESET[:SEED]`` for a model of a known architecture with seeded random weights
  (``PRESETS``; profiling and GPU checks at real sizes without downloading weights).

The config of a single file is inferred from its tensors (convert.py). Weights are read straight
to the target device and cast to the requested dtype; the model is built on the meta device and
takes the loaded tensors as its parameters, so no second copy exists.

``LoadedModel.forward`` runs one model evaluation the way ComfyUI defines it for flow models: the
input is the latent in model space, the output the model's velocity prediction in float32 (the
sampler forms ``denoised = x - out * sigma``). Timesteps: SD3 takes ``sigma * 1000``; FLUX's time
embedding has a factor 1000 inside (diffusers multiplies in its own forward), so ComfyUI's
timestep ``sigma`` enters as ``sigma * 1000``, in float32 (diffusers would first round it to the
model dtype), and FLUX-dev's guidance likewise. The forward is our own short loop over diffusers'
modules because the tokens are sharded after embedding and gathered before unpatchifying.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InvalidRequest
from .flux_inputs import flux_image_inputs
from .convert import FLUX_CLASS, SD3_CLASS, infer_config, to_diffusers
from ..core.executor import ModelInfo
from .parallel import GroupComm, SeqShard, StepBinding, attention_backend, bind, gather_tokens, install_processors
from .stepcache import ROPE_CACHE_SIZE, LruCache, padded_lengths
from .samplers import timestep_of_sigma
from .tiny import TINY_FLUX_CONFIG, TINY_SD3_CONFIG, model_class, model_kwargs, random_model
from . import families

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: FLUX's time and guidance embeddings scale their input by this (BFL: time_factor).
FLUX_TIME_FACTOR = 1000.0
#: Text tokens the real pipelines feed (FLUX-dev T5 at 512; SD3: 77 CLIP + 256 T5).
DEFAULT_TEXT_TOKENS = {"flux": 512, "sd3": 333}
FLUX_GUIDANCE_DEFAULT = 3.5

_FLUX_DEV = {
    "_class_name": FLUX_CLASS, "patch_size": 1, "in_channels": 64, "out_channels": 64, "num_layers": 19,
    "num_single_layers": 38, "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": [16, 56, 56],
}
_SD3_MEDIUM = {
    "_class_name": SD3_CLASS, "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16,
    "num_layers": 24, "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 192,
    "dual_attention_layers": [], "qk_norm": None,
}
#: Architectures known by name, for ``random:NAME`` sources.
PRESETS: dict[str, dict] = {
    "flux-dev": _FLUX_DEV,
    "flux-schnell": {**_FLUX_DEV, "guidance_embeds": False},
    "sd3-medium": _SD3_MEDIUM,
    "sd3.5-medium": {**_SD3_MEDIUM, "pos_embed_max_size": 384, "dual_attention_layers": list(range(13)),
                     "qk_norm": "rms_norm"},
    "sd3.5-large": {**_SD3_MEDIUM, "num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432,
                    "qk_norm": "rms_norm"},
    "tiny-flux": TINY_FLUX_CONFIG,
    "tiny-sd3": TINY_SD3_CONFIG,
    **families.PRESETS,  # Qwen-Image and Wan (families.py)
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise InvalidRequest(f"unknown dtype {name!r} (known: {', '.join(DTYPES)})") from None


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def family_of(config: dict) -> str:
    other = families.family_of_class(config.get("_class_name"))
    if other:
        return other
    return "flux" if config.get("_class_name") == FLUX_CLASS else "sd3"


def allowed_degrees(num_heads: int, max_degree: int | None = None) -> tuple[int, ...]:
    """Sequence-parallel degrees a model supports: powers of two that divide its head count."""
    out, k = [], 1
    while num_heads % k == 0 and (max_degree is None or k <= max_degree):
        out.append(k)
        k *= 2
    return tuple(out)


# ----------------------------------------------------------------- reading weights
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
              "F8_E5M2": getattr(torch, "float8_e5m2", None)}


def _read_safetensors(files: list[Path], device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor of ``files`` on ``device``; on the meta device only shapes and dtypes are read."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for f in files:
        if device.type != "meta":
            sd.update(load_file(str(f), device=str(device)))
            continue
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                sl = fh.get_slice(key)
                sd[key] = torch.empty(sl.get_shape(), dtype=_ST_DTYPES.get(sl.get_dtype()) or torch.uint8,
                                      device="meta")
    return sd


def _is_fp8_file(path: Path) -> bool:
    from .quant import is_quantized_source

    return is_quantized_source(str(path))


def _diffusers_folder(path: Path) -> tuple[dict, list[Path]]:
    if not (path / "config.json").exists() and (path / "transformer" / "config.json").exists():
        path = path / "transformer"
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise InvalidRequest(f"{path} is a folder without config.json (not a diffusers model folder)")
    config = json.loads(cfg_path.read_text(encoding="utf-8"))
    if config.get("_class_name") not in (FLUX_CLASS, SD3_CLASS, *families.CLASS_FAMILY):
        raise InvalidRequest(f"{path}: {config.get('_class_name')!r} is not a FLUX, SD3, Qwen-Image or Wan transformer")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise InvalidRequest(f"{path} holds no .safetensors weights")
    return config, files


def read_checkpoint(source: str, device: str | torch.device = "cpu") -> tuple[dict, dict[str, torch.Tensor]]:
    """(diffusers config, diffusers-named weights) of a folder or single file."""
    path = Path(source).expanduser()
    if not path.exists():
        raise InvalidRequest(f"no model at {source}")
    device = torch.device(device)
    if path.is_dir():
        config, files = _diffusers_folder(path)
        return config, _read_safetensors(files, device)
    if path.suffix == ".gguf" or (device.type == "meta" and _is_fp8_file(path)):
        from .quant import read_quantized

        ckpt = read_quantized(str(path), torch.device("cpu"))
        return ckpt.config, {k: torch.empty(getattr(v, "shape"), device="meta") for k, v in ckpt.tensors.items()}
    if path.suffix not in (".safetensors", ".sft"):
        raise InvalidRequest(f"{source}: only .safetensors and .gguf files are read (no pickled checkpoints)")
    raw = _read_safetensors([path], device)
    other = families.read_single_file(raw)
    if other is not None:
        return other
    family, sd = to_diffusers(raw)
    return infer_config(family, sd), sd


# ----------------------------------------------------------------- the model
@dataclass
class LoadedModel:
    """A DiT on one device, with our attention processors installed."""

    name: str
    family: str
    config: dict
    module: torch.nn.Module
    dtype: torch.dtype
    device: torch.device
    source: str
    storage: str = ""  # how the weights are held (quant.py): "bf16", "fp8_e4m3fn", "gguf Q8_0", ...

    def __post_init__(self) -> None:
        if self.family in families.DEFAULT_TEXT_TOKENS:
            self.processor = families.install_processor(self.module, self.family)
        else:
            self.processor = install_processors(self.module, self.family)
        #: FLUX rotary embeddings per (latent size, text length, degree, rank)
        self.rope_cache = LruCache(ROPE_CACHE_SIZE)

    @property
    def num_heads(self) -> int:
        return int(self.config["num_attention_heads"])

    @property
    def patch_size(self) -> int:
        if self.family == "wan":
            return int(self.config["patch_size"][1])
        return 2 if self.family in ("flux", "qwen_image") else int(self.config["patch_size"])

    def info(self) -> ModelInfo:
        from .quant import resident_bytes

        info = info_of_config(self.name, self.config, self.dtype, self.source)
        return dataclasses.replace(info, storage=self.storage or info.dtype, resident_bytes=resident_bytes(self.module))

    def num_attention_layers(self) -> int:
        return num_attention_layers(self.config)

    def num_image_tokens(self, height: int, width: int) -> int:
        """Tokens of a latent of ``height`` x ``width`` (latent pixels)."""
        p = self.patch_size
        return (height // p) * (width // p)

    @property
    def concat_channels(self) -> int:
        """Extra input channels beyond the latent's (FLUX Fill: 80)."""
        if self.family != "flux":
            return 0
        return (int(self.config["in_channels"]) - int(self.config["out_channels"])) // 4

    @torch.no_grad()
    def forward(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                guidance: torch.Tensor | None = None, comm: GroupComm | None = None,
                vote: float | torch.Tensor = 0.0, concat: torch.Tensor | None = None, refs: tuple = (),
                ref_method: str = "offset", *, text_lengths: Sequence[int] | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Model output [B, C, H, W] (float32) for latents ``x`` at noise levels ``sigma`` [B].

        With ``comm`` of degree k this rank computes its token shard and the output is gathered;
        every rank returns the full output and the k ``vote`` values of the group (None alone).
        FLUX only: ``concat`` holds a Fill model's extra input channels, ``refs`` Kontext reference
        latents appended as image tokens (flux_inputs.py); both in model space.
        ``text_lengths`` (one per row): rows whose text is shorter than ``context`` are padded;
        their padding is masked out of every attention (keys), so each row's output equals its
        own unpadded forward.
        """
        if self.family in families.DEFAULT_TEXT_TOKENS:  # Qwen-Image, Wan (families.py)
            return families.forward(self, x, sigma, context, comm, vote)
        b, _, h, w = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise InvalidRequest(f"latent {h}x{w} is not a multiple of the patch size {p}")
        degree = comm.degree if comm is not None else 1
        if self.num_heads % degree:
            raise InvalidRequest(f"degree {degree} does not divide the {self.num_heads} heads of {self.name}")
        if self.family == "flux":
            if (concat is None) != (self.concat_channels == 0):
                raise InvalidRequest(f"{self.name} is a FLUX Fill model: it needs the masked image and the mask"
                                     if concat is None else f"{self.name} takes no Fill channels (not a Fill model)")
            packed, img_ids, num_generated = flux_image_inputs(x, concat, refs, ref_method)
            num_image = packed.shape[1]
            # what fixes the position ids: the latent size and the references' sizes and layout
            ids_key = (h, w, tuple(tuple(r.shape[-2:]) for r in refs), ref_method if refs else None)
        else:
            if concat is not None or refs:
                raise InvalidRequest("Fill channels and reference latents are for FLUX models only")
            num_image = num_generated = (h // p) * (w // p)
        shard = SeqShard(comm.index if comm else 0, degree, context.shape[1], num_image)
        lengths = padded_lengths(text_lengths, b, context.shape[1])
        binding = StepBinding(comm if degree > 1 else None, shard, lengths, text_first=self.family == "flux")
        with attention_backend(self.device), bind(self.processor, binding):
            if self.family == "flux":
                local = self._flux_tokens(packed, img_ids, ids_key, sigma, context, pooled, guidance, shard)
            else:
                local = self._sd3_tokens(x, sigma, context, pooled, shard)
        if degree > 1:
            tokens, votes = gather_tokens(local, shard.image_sizes, comm, vote)
        else:
            tokens, votes = local, None
        if num_image != num_generated:
            tokens = tokens[:, :num_generated]
        return self._untokenize(tokens.float(), b, h, w), votes

    def flux_rope(self, img_ids: torch.Tensor, ids_key: tuple, shard: SeqShard) -> tuple[torch.Tensor, torch.Tensor]:
        """FLUX's rotary embedding of this rank's [text, image] tokens, computed once per (position
        ids: ``ids_key``, text length, degree, rank) and kept (``rope_cache``)."""
        key = (ids_key, shard.num_text, shard.degree, shard.rank)
        rope = self.rope_cache.get(key)
        if rope is None:
            i0, i1 = shard.image_range
            t0, t1 = shard.text_range
            txt_ids = torch.zeros(t1 - t0, 3, device=img_ids.device)
            rope = self.module.pos_embed(torch.cat([txt_ids, img_ids[i0:i1]], dim=0))
            self.rope_cache.put(key, rope)
        return rope

    def _flux_tokens(self, packed, img_ids, ids_key, sigma, context, pooled, guidance,
                     shard: SeqShard) -> torch.Tensor:
        m, dt = self.module, self.dtype
        b = packed.shape[0]
        i0, i1 = shard.image_range
        t0, t1 = shard.text_range
        timestep = timestep_of_sigma("flux", sigma.float()) * FLUX_TIME_FACTOR
        pooled = pooled.to(dt)
        if self.config.get("guidance_embeds"):
            if guidance is None:
                guidance = torch.full((b,), FLUX_GUIDANCE_DEFAULT, device=packed.device)
            temb = m.time_text_embed(timestep, guidance.float() * FLUX_TIME_FACTOR, pooled)
        else:
            temb = m.time_text_embed(timestep, pooled)
        hs = m.x_embedder(packed[:, i0:i1].to(dt))
        ehs = m.context_embedder(context[:, t0:t1].to(dt))
        rope = self.flux_rope(img_ids, ids_key, shard)
        for block in m.transformer_blocks:
            ehs, hs = block(hidden_states=hs, encoder_hidden_states=ehs, temb=temb, image_rotary_emb=rope)
        for block in m.single_transformer_blocks:
            ehs, hs = block(hidden_states=hs, encoder_hidden_states=ehs, temb=temb, image_rotary_emb=rope)
        return m.proj_out(m.norm_out(hs, temb))

    def _sd3_tokens(self, x, sigma, context, pooled, shard: SeqShard) -> torch.Tensor:
        m, dt = self.module, self.dtype
        i0, i1 = shard.image_range
        t0, t1 = shard.text_range
        # The patch embedding is a strided convolution plus a positional table: cheap, so each
        # rank embeds the whole latent and keeps its rows (identical to embedding the shard).
        hs = m.pos_embed(x.to(dt))[:, i0:i1]
        temb = m.time_text_embed(timestep_of_sigma("sd3", sigma.float()), pooled.to(dt))
        ehs = m.context_embedder(context[:, t0:t1].to(dt))
        for block in m.transformer_blocks:
            ehs, hs = block(hidden_states=hs, encoder_hidden_states=ehs, temb=temb)
        return m.proj_out(m.norm_out(hs, temb))

    def _untokenize(self, tokens: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
        p = self.patch_size
        c = tokens.shape[-1] // (p * p)
        if self.family == "flux":  # (c, ph, pw) channel order, as packed above
            return tokens.view(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
        return tokens.view(b, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)


def load_transformer(source: str, *, dtype: str | torch.dtype = "bf16", device: str | torch.device = "cpu",
                     name: str | None = None) -> LoadedModel:
    """Load a FLUX or SD3 transformer from ``source`` (see the module docstring) onto ``device``.

    GGUF and fp8 files, and an fp8 ``dtype`` (``quant.FP8_FORMATS``), keep the weights quantised (quant.py)."""
    quantized = _load_quantized_hook(source, dtype, device, name)
    if quantized is not None:
        return quantized
    dt, device = parse_dtype(dtype), torch.device(device)
    if source.startswith("random:"):
        preset, _, seed = source[len("random:"):].partition(":")
        if preset not in PRESETS:
            raise InvalidRequest(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
        config = dict(PRESETS[preset])
        module = random_model(config, seed=int(seed or 0), dtype=dt, device=device)
    else:
        config, sd = read_checkpoint(source, device)
        cls = model_class(config)
        with torch.device("meta"):
            module = cls(**model_kwargs(config))
        sd = {k: v.to(dt) if v.is_floating_point() else v for k, v in sd.items()}
        missing, unexpected = module.load_state_dict(sd, strict=False, assign=True)
        if missing or unexpected:
            raise InvalidRequest(f"{source}: weights do not fit the inferred architecture "
                                 f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
        families.materialize(module, config, device)
        left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
        if left:
            raise InvalidRequest(f"{source}: no weights for {left[:5]}")
        module = module.eval()  # tensors already on the device, in the dtype
    model = LoadedModel(name=name or Path(source).stem, family=family_of(config), config=config,
                        module=module, dtype=dt, device=device, source=source)
    log.info("loaded %s (%s, %d heads, %s) from %s on %s", model.name, model.family, model.num_heads,
             dtype_name(dt), source, device)
    return model


def _load_quantized_hook(source: str, dtype, device, name: str | None) -> "LoadedModel | None":
    from .quant import FP8_FORMATS, is_quantized_source, load_quantized

    if isinstance(dtype, torch.dtype) or not (dtype in FP8_FORMATS or is_quantized_source(source)):
        return None
    device = torch.device(device)
    if source.startswith("random:"):
        preset, _, seed = source[len("random:"):].partition(":")
        if preset not in PRESETS:
            raise InvalidRequest(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
        source_or_sd = (dict(PRESETS[preset]), random_model(dict(PRESETS[preset]), seed=int(seed or 0)).state_dict())
    else:
        source_or_sd = source
    config, module, dt, storage = load_quantized(source_or_sd, str(dtype), device)
    model = LoadedModel(name=name or Path(source).stem, family=family_of(config), config=config, module=module,
                        dtype=dt, device=device, source=source, storage=storage)
    log.info("loaded %s (%s, %s weights, compute %s) from %s on %s", model.name, model.family, storage,
             dtype_name(dt), source, device)
    return model


def info_of_config(name: str, config: dict, dtype: torch.dtype, source: str) -> ModelInfo:
    family = family_of(config)
    if family in families.DEFAULT_TEXT_TOKENS:
        return ModelInfo(
            name=name, family=family, num_heads=int(config["num_attention_heads"]),
            in_channels=families.latent_channels(family, config), context_dim=families.context_dim(family, config),
            pooled_dim=0, guidance_embeds=False, dtype=dtype_name(dtype),
            source=source if source.startswith("random:") else Path(source).name,
            # size-aware pricing (service/catalog.py ModelCost): scaled from the family's reference by FLOPs
            num_attention_layers=num_attention_layers(config),
            hidden_size=int(config["num_attention_heads"]) * int(config["attention_head_dim"]),
            num_text_tokens=families.DEFAULT_TEXT_TOKENS[family])
    latent_channels = config["out_channels"] // 4 if family == "flux" else config["in_channels"]
    concat_channels = (config["in_channels"] - config["out_channels"]) // 4 if family == "flux" else 0
    return ModelInfo(
        name=name, family=family, num_heads=int(config["num_attention_heads"]), in_channels=int(latent_channels),
        context_dim=int(config["joint_attention_dim"]), pooled_dim=int(config["pooled_projection_dim"]),
        guidance_embeds=bool(config.get("guidance_embeds", False)), dtype=dtype_name(dtype),
        source=source if source.startswith("random:") else Path(source).name,
        concat_channels=int(concat_channels),
        num_attention_layers=num_attention_layers(config),
        hidden_size=int(config["num_attention_heads"]) * int(config["attention_head_dim"]),
        num_text_tokens=DEFAULT_TEXT_TOKENS[family],
    )


def num_attention_layers(config: dict) -> int:
    """Attention layers of a diffusers config (FLUX: double + single blocks; SD3: joint + dual; Qwen-Image and
    Wan: families.py)."""
    family = family_of(config)
    if family in families.DEFAULT_TEXT_TOKENS:
        return families.num_attention_layers(family, config)
    if family == "flux":
        return int(config["num_layers"]) + int(config["num_single_layers"])
    return int(config["num_layers"]) + len(config.get("dual_attention_layers") or ())


def source_config(source: str) -> dict:
    """The diffusers config of ``source`` from tensor shapes alone (no weights are read)."""
    if source.startswith("random:"):
        preset = source[len("random:"):].partition(":")[0]
        if preset not in PRESETS:
            raise InvalidRequest(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
        return dict(PRESETS[preset])
    return read_checkpoint(source, "meta")[0]


def model_info(source: str, *, name: str | None = None, dtype: str = "bf16") -> ModelInfo:
    """ModelInfo of a checkpoint without loading it (what the planner needs before the workers load it)."""
    from .quant import FP8_FORMATS

    dt = parse_dtype("bf16" if dtype in FP8_FORMATS else dtype)
    return info_of_config(name or Path(source).stem, source_config(source), dt, source)
