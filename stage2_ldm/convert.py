"""DiT weights of facebookresearch/DiT and diffusers' DiTTransformer2DModel in and out of our DiT (stage2_ldm/dit.py).

    architecture, state = dit_from_official(official_state, num_heads)      # DiT-XL-2-256x256.pt
    official_state = official_from_dit(state)
    architecture, state = dit_from_diffusers(diffusers_config, diffusers_state)
    diffusers_config, diffusers_state = diffusers_from_dit(model_config, state, approximate=False)

`architecture` holds the keys of our DiT's model config that the weights determine (depth, hidden_size, num_heads,
patch_size, mlp_ratio, learn_sigma, in_channels, input_size, num_classes, and for diffusers' variant mlp_norm_eps
and time_frequency_shift); the caller adds the objective and the latent statistics.

facebookresearch/DiT is our DiT under other names (x_embedder.proj = patch_embed, y_embedder.embedding_table =
y_embedder.table, mlp.fc1/fc2 = mlp.0/2, adaLN_modulation = modulation). Its checkpoint does not record the number
of heads, which the caller takes from ldm.num_heads. Its position embedding (a stored parameter) puts the column
before the row; ours are stored too, so a converted model keeps the layout it was trained with.

diffusers' DiTTransformer2DModel is the same network except that
- every block has its own timestep + label embedding, where DiT has one: we take them only when they are all equal
  (conversions of DiT checkpoints copy the one into every block) and refuse otherwise;
- its time features use the frequencies 10000^(-k/127), not DiT's 10000^(-k/128), and the LayerNorm before its MLP
  has eps `norm_eps` (1e-5 by default), not DiT's 1e-6: our DiT holds both (time_frequency_shift, mlp_norm_eps), so
  imports are exact; exporting a DiT with DiT's frequencies to diffusers is not, and needs approximate=True;
- its position embedding is computed, not stored, with the column first: a DiT of ours (row first) is exported with
  the two halves of its hidden channels swapped, the same function (every operation on the residual stream is per
  channel, LayerNorm included, and the conditioning vector is left as it is).
"""
from __future__ import annotations

import math
import re

import torch

from shared.config_check import COUNT, POSITIVE
from shared.dit_blocks import sincos_2d
from shared.errors import ConfigError, DataError
from shared.foreign_weights import WeightsExtent, check_fits_in_memory, check_values, renamed
from stage2_ldm.dit import DiT

DIFFUSERS_DIT_CLASS = "DiTTransformer2DModel"
# DiTTransformer2DModel.__init__'s defaults (diffusers 0.42), for the keys a config.json may leave out.
DIFFUSERS_DIT_DEFAULTS = {
    "num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": None, "num_layers": 28,
    "sample_size": 32, "patch_size": 2, "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_zero", "norm_elementwise_affine": False, "norm_eps": 1e-5, "attention_bias": True,
}
DIFFUSERS_TIME_FREQUENCY_SHIFT = 1
DIFFUSERS_MLP_RATIO = 4.0  # FeedForward's `mult`, not in the config
# The tensors of a facebookresearch/DiT state dict whose shapes give its architecture, and their ranks.
OFFICIAL_SHAPE_TENSORS = {"x_embedder.proj.weight": 4, "pos_embed": 3, "y_embedder.embedding_table.weight": 2,
                          "final_layer.linear.weight": 2, "blocks.0.mlp.fc1.weight": 2}
# Our parameter name (pattern) -> facebookresearch/DiT's.
OFFICIAL_RENAMES: tuple[tuple[str, str], ...] = (
    (r"patch_embed\.(\w+)", r"x_embedder.proj.\1"),
    (r"pos_embed", r"pos_embed"),
    (r"t_embedder\.mlp\.([02])\.(\w+)", r"t_embedder.mlp.\1.\2"),
    (r"y_embedder\.table\.weight", r"y_embedder.embedding_table.weight"),
    (r"blocks\.(\d+)\.attn\.(qkv|proj)\.(\w+)", r"blocks.\1.attn.\2.\3"),
    (r"blocks\.(\d+)\.mlp\.0\.(\w+)", r"blocks.\1.mlp.fc1.\2"),
    (r"blocks\.(\d+)\.mlp\.2\.(\w+)", r"blocks.\1.mlp.fc2.\2"),
    (r"blocks\.(\d+)\.modulation\.1\.(\w+)", r"blocks.\1.adaLN_modulation.1.\2"),
    (r"final_layer\.modulation\.1\.(\w+)", r"final_layer.adaLN_modulation.1.\1"),
    (r"final_layer\.linear\.(\w+)", r"final_layer.linear.\1"),
)
# Our parameter name (pattern) -> diffusers' names: stacked along dim 0 (q, k, v -> qkv); {block} marks the
# embedding every block has a copy of.
DIFFUSERS_RENAMES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"patch_embed\.(\w+)", (r"pos_embed.proj.\1",)),
    (r"t_embedder\.mlp\.0\.(\w+)", (r"transformer_blocks.{block}.norm1.emb.timestep_embedder.linear_1.\1",)),
    (r"t_embedder\.mlp\.2\.(\w+)", (r"transformer_blocks.{block}.norm1.emb.timestep_embedder.linear_2.\1",)),
    (r"y_embedder\.table\.weight", (r"transformer_blocks.{block}.norm1.emb.class_embedder.embedding_table.weight",)),
    (r"blocks\.(\d+)\.attn\.qkv\.(\w+)",
     tuple(rf"transformer_blocks.\1.attn1.{name}.\2" for name in ("to_q", "to_k", "to_v"))),
    (r"blocks\.(\d+)\.attn\.proj\.(\w+)", (r"transformer_blocks.\1.attn1.to_out.0.\2",)),
    (r"blocks\.(\d+)\.mlp\.0\.(\w+)", (r"transformer_blocks.\1.ff.net.0.proj.\2",)),
    (r"blocks\.(\d+)\.mlp\.2\.(\w+)", (r"transformer_blocks.\1.ff.net.2.\2",)),
    (r"blocks\.(\d+)\.modulation\.1\.(\w+)", (r"transformer_blocks.\1.norm1.linear.\2",)),
    (r"final_layer\.modulation\.1\.(\w+)", (r"proj_out_1.\1",)),
    (r"final_layer\.linear\.(\w+)", (r"proj_out_2.\1",)),
)


def column_first_positions(grid_size: int, hidden_size: int) -> torch.Tensor:
    """DiT's and diffusers' fixed position embedding (1, grid², D): the column's sin-cos, then the row's."""
    return swap_halves(sincos_2d(grid_size, grid_size, hidden_size))[None]


def swap_halves(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    first, second = x.chunk(2, dim=dim)
    return torch.cat([second, first], dim=dim)


def checked_architecture(depth: int, hidden_size: int, num_heads: int, patch_size: int, mlp_width: int,
                         in_channels: int, out_channels: int, tokens: int, num_classes: int, source: str) -> dict:
    """Our DiT's model-config keys of these dimensions; DataError where our DiT has no such network."""
    grid = math.isqrt(tokens)
    problems = []
    if out_channels not in (in_channels, 2 * in_channels):
        problems.append(f"{out_channels} output channels for {in_channels} input channels (expected C or 2C)")
    if tokens < 1 or grid * grid != tokens:
        problems.append(f"{tokens} tokens (not a square grid)")
    if hidden_size % num_heads:
        problems.append(f"width {hidden_size} with {num_heads} heads (not divisible)")
    if hidden_size % 4:
        problems.append(f"width {hidden_size} (its 2D sin-cos positions need a multiple of 4)")
    if problems:
        raise DataError(f"{source} is not a DiT this project can hold: {'; '.join(problems)}")
    return {"depth": depth, "hidden_size": hidden_size, "num_heads": num_heads, "patch_size": patch_size,
            "mlp_ratio": mlp_width / hidden_size, "learn_sigma": out_channels == 2 * in_channels,
            "in_channels": in_channels, "input_size": grid * patch_size, "num_classes": num_classes}


def block_count(state: dict, prefix: str) -> int:
    indices = {int(m.group(1)) for name in state if (m := re.match(rf"{prefix}\.(\d+)\.", name))}
    if indices != set(range(len(indices))):
        raise DataError(f"the weights' blocks are not numbered 0..N-1 ({sorted(indices)[:5]}...)")
    return len(indices)


def take(state: dict[str, torch.Tensor], names: tuple[str, ...] | str, shape: torch.Size, source: str,
         ours: str) -> torch.Tensor:
    """The tensor(s) under `names`, removed from `state` and stacked along dim 0 into our tensor `ours` of `shape`;
    each checked to have its part of that shape first."""
    names = (names,) if isinstance(names, str) else names
    missing = [name for name in names if name not in state]
    if missing:
        raise DataError(f"{source} has no tensor {missing[0]}: it is not a complete DiT state dict")
    part = (shape[0] // len(names), *shape[1:])
    for name in names:
        if tuple(state[name].shape) != part:
            raise DataError(f"{source}: {name} has shape {tuple(state[name].shape)} where the DiT its other tensors "
                            f"describe has {part} (our {ours})")
    return torch.cat([state.pop(name) for name in names]).float()


def no_leftovers(state: dict, source: str) -> None:
    if state:
        raise DataError(f"{source} holds {len(state)} tensors a DiT does not have (e.g. {sorted(state)[0]})")


def expected_state(architecture: dict, **variant) -> dict[str, torch.Tensor]:
    """Names and shapes of our DiT's state dict (on the meta device: nothing is allocated)."""
    keys = ("input_size", "in_channels", "num_classes", "patch_size", "hidden_size", "depth", "num_heads",
            "mlp_ratio", "learn_sigma")
    with torch.device("meta"):
        return DiT(**{key: architecture[key] for key in keys}, **variant).state_dict()


def convert_into_ours(state: dict, architecture: dict, renames, source: str, variant: dict) -> dict:
    converted = {}
    for name, like in expected_state(architecture, **variant).items():
        if name == "pos_embed" and "pos_embed" not in state:  # computed, not stored (diffusers)
            check_fits_in_memory(16 * like.numel(), f"computing its position embedding ({like.shape[1]} tokens × "
                                 f"{like.shape[2]} channels, in float64)", source)
            converted[name] = column_first_positions(architecture["input_size"] // architecture["patch_size"],
                                                     architecture["hidden_size"])
        else:
            converted[name] = take(state, renamed(name, renames), like.shape, source, name)
    no_leftovers(state, source)
    return converted


def dit_from_official(official: dict[str, torch.Tensor], num_heads: int,
                      source: str = "the DiT checkpoint") -> tuple[dict, dict[str, torch.Tensor]]:
    """(architecture, our state dict) of a facebookresearch/DiT state dict; num_heads is not recorded in it."""
    state = dict(official)
    for name, rank in OFFICIAL_SHAPE_TENSORS.items():
        if name not in state:
            raise DataError(f"{source} has no {name}: it is not a facebookresearch/DiT state dict")
        if state[name].ndim != rank or 0 in state[name].shape:
            raise DataError(f"{source}: {name} has shape {tuple(state[name].shape)}, not {rank} non-zero dimensions: "
                            f"it is not a facebookresearch/DiT state dict")
    hidden, in_channels, patch = state["x_embedder.proj.weight"].shape[:3]
    architecture = checked_architecture(
        block_count(state, "blocks"), hidden, num_heads, patch, state["blocks.0.mlp.fc1.weight"].shape[0],
        in_channels, state["final_layer.linear.weight"].shape[0] // patch**2, state["pos_embed"].shape[1],
        state["y_embedder.embedding_table.weight"].shape[0] - 1, source)  # the last row is the null class
    return architecture, convert_into_ours(state, architecture, OFFICIAL_RENAMES, source, {})


def official_from_dit(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """facebookresearch/DiT's state dict of ours."""
    return {renamed(name, OFFICIAL_RENAMES): tensor for name, tensor in state.items()}


def diffusers_dit_schema(extent: WeightsExtent) -> dict:
    """What each DiTTransformer2DModel setting must be (shared.foreign_weights.check_values), sizes bounded by
    `extent`. sample_size is not: the weights do not depend on it (its memory is checked where it is used)."""
    size = extent.size()
    return {
        "num_attention_heads": size, "attention_head_dim": size, "in_channels": size,
        "out_channels": extent.size(nullable=True), "num_layers": extent.count(),
        "sample_size": COUNT, "patch_size": size, "activation_fn": str, "num_embeds_ada_norm": size, "norm_type": str,
        "norm_elementwise_affine": bool, "norm_eps": POSITIVE, "attention_bias": bool,
    }


def dit_from_diffusers(config: dict, diffusers_state: dict[str, torch.Tensor],
                       source: str = "the DiTTransformer2DModel") -> tuple[dict, dict[str, torch.Tensor]]:
    """(architecture, our state dict) of a DiTTransformer2DModel's config.json and state dict, exact; DataError
    where its blocks' embeddings differ."""
    class_name = config.get("_class_name", DIFFUSERS_DIT_CLASS)
    if class_name not in (DIFFUSERS_DIT_CLASS, "Transformer2DModel"):  # the older name of DiT pipelines
        raise DataError(f"{source} is a {class_name!r}, not a {DIFFUSERS_DIT_CLASS}")
    settings = {**DIFFUSERS_DIT_DEFAULTS, **{k: v for k, v in config.items() if k in DIFFUSERS_DIT_DEFAULTS}}
    check_values(settings, diffusers_dit_schema(WeightsExtent.of(diffusers_state)), source)
    if settings["sample_size"] % settings["patch_size"]:
        raise DataError(f"{source}: config.json's sample_size={settings['sample_size']} is not a multiple of its "
                        f"patch_size={settings['patch_size']}")
    fixed = {"activation_fn": "gelu-approximate", "norm_type": "ada_norm_zero", "norm_elementwise_affine": False,
             "attention_bias": True}
    different = [f"{key}={settings[key]}" for key, value in fixed.items() if settings[key] != value]
    if different:
        raise DataError(f"{source} has {', '.join(different)}; only DiT's ({fixed}) has a counterpart here")
    state = dict(diffusers_state)
    depth = block_count(state, "transformer_blocks")
    shared_embedding = [name for name in state if name.startswith("transformer_blocks.0.norm1.emb.")]
    for block in range(1, depth):
        for name in shared_embedding:
            other = state.pop(name.replace("transformer_blocks.0.", f"transformer_blocks.{block}.", 1), None)
            if other is None or not torch.equal(other, state[name]):
                raise DataError(f"{source}: block {block}'s timestep/label embedding differs from block 0's; our DiT "
                                f"has one embedding for all blocks (as DiT has), so no exact conversion exists")
    state = {name.replace("transformer_blocks.0.norm1.emb.", "transformer_blocks.{block}.norm1.emb."): tensor
             for name, tensor in state.items()}
    hidden = settings["num_attention_heads"] * settings["attention_head_dim"]
    in_channels, patch = settings["in_channels"], settings["patch_size"]
    mlp = state.get("transformer_blocks.0.ff.net.0.proj.weight")
    if mlp is None or mlp.ndim != 2:
        raise DataError(f"{source} has no 2-dimensional transformer_blocks.0.ff.net.0.proj.weight: it is not a "
                        f"complete {DIFFUSERS_DIT_CLASS} state dict")
    architecture = checked_architecture(
        depth, hidden, settings["num_attention_heads"], patch,
        mlp.shape[0], in_channels,
        settings["out_channels"] or in_channels, (settings["sample_size"] // patch) ** 2,
        settings["num_embeds_ada_norm"], source)
    architecture.update(mlp_norm_eps=float(settings["norm_eps"]), time_frequency_shift=DIFFUSERS_TIME_FREQUENCY_SHIFT)
    variant = {key: architecture[key] for key in ("mlp_norm_eps", "time_frequency_shift")}
    return architecture, convert_into_ours(state, architecture, DIFFUSERS_RENAMES, source, variant)


def diffusers_from_dit(dit: DiT, approximate: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
    """(DiTTransformer2DModel config, its state dict) of our DiT. ConfigError where diffusers' class cannot hold it;
    approximate: also where it holds it only approximately (DiT's time frequencies)."""
    block = dit.blocks[0]
    hidden, heads = dit.pos_embed.shape[-1], block.attn.num_heads
    grid = dit.grid_size
    if block.mlp[0].out_features != DIFFUSERS_MLP_RATIO * hidden:
        raise ConfigError(f"export.format=diffusers: the DiT's MLP is {block.mlp[0].out_features / hidden:g}× its "
                          f"width; DiTTransformer2DModel's is {DIFFUSERS_MLP_RATIO:g}×")
    if dit.t_embedder.frequency_shift != DIFFUSERS_TIME_FREQUENCY_SHIFT and not approximate:
        raise ConfigError("export.format=diffusers: this DiT embeds time with DiT's frequencies 10000^(-k/128) and "
                          "DiTTransformer2DModel hard-codes 10000^(-k/127), so no diffusers folder computes it "
                          "exactly: use export.format=dit, or export.approximate=true to write it anyway (the "
                          "deviation is measured and reported)")
    state = dit.state_dict()
    positions = state.pop("pos_embed").cpu()
    if torch.allclose(positions, sincos_2d(grid, grid, hidden)[None], atol=1e-6):
        state = swap_hidden_halves(state)  # row first (ours) -> column first (diffusers)
    elif not torch.allclose(positions, column_first_positions(grid, hidden), atol=1e-6):
        raise ConfigError("export.format=diffusers: the DiT's position embedding is not a 2D sin-cos one, which "
                          "DiTTransformer2DModel computes and does not store: use export.format=safetensors")
    config = {
        "_class_name": DIFFUSERS_DIT_CLASS, "num_attention_heads": heads, "attention_head_dim": hidden // heads,
        "in_channels": dit.in_channels, "out_channels": dit.out_channels, "num_layers": len(dit.blocks),
        "sample_size": grid * dit.patch_size, "patch_size": dit.patch_size, "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": dit.num_classes, "norm_type": "ada_norm_zero", "norm_elementwise_affine": False,
        "norm_eps": block.norm2.eps, "attention_bias": True,
    }
    converted = {}
    for name, tensor in state.items():
        targets = renamed(name, DIFFUSERS_RENAMES)
        if "{block}" in targets[0]:  # the one embedding, copied into every block
            converted.update({targets[0].format(block=i): tensor for i in range(len(dit.blocks))})
        else:
            converted.update(zip(targets, tensor.chunk(len(targets))))
    return config, converted


def swap_hidden_halves(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same DiT with the two halves of its residual-stream channels swapped: every weight that writes the
    stream swaps its output rows (per chunk for the adaLN shift/scale/gate), every weight that reads it swaps its
    input columns. The conditioning vector (time + label embedding) is not part of the stream."""
    swapped = {}
    for name, tensor in state.items():
        if name.startswith("patch_embed.") or re.fullmatch(r"blocks\.\d+\.(attn\.proj|mlp\.2)\.\w+", name):
            tensor = swap_halves(tensor, 0)  # writes the stream
        elif re.fullmatch(r"(blocks\.\d+|final_layer)\.modulation\.1\.\w+", name):
            tensor = torch.cat([swap_halves(chunk, 0) for chunk in tensor.chunk(6 if "blocks" in name else 2)])
        elif re.fullmatch(r"blocks\.\d+\.(attn\.qkv|mlp\.0)\.weight|final_layer\.linear\.weight", name):
            tensor = swap_halves(tensor, 1)  # reads the stream
        swapped[name] = tensor
    return swapped
