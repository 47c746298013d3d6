"""LoRA on the image tower of every model family, through peft.

Which modules get LoRA is the family's fact: ``model.lora_layout()`` (embedkit/models/base.py ``TowerLayout``)
names the tower's repeated blocks and the default targets inside each, per preset; this module resolves user
targets against it, refuses targets peft would silently ignore, and wraps the tower. The layouts the families ship:

============  =============================================  ========================  ===========================
layout        blocks                                         ``study`` targets         ``embedkit`` targets
============  =============================================  ========================  ===========================
openclip-vit  ``transformer.resblocks.N`` (OpenAI CLIP,      ``attn.in_proj`` (the     ``attn`` (in_proj and
              CheXzero)                                      MultiheadAttention's      out_proj), ``mlp.c_fc``,
                                                             in_proj alone)            ``mlp.c_proj``
timm-vit      ``trunk.blocks.N`` (BiomedCLIP)                ``attn.qkv``              ``attn.qkv``, ``attn.proj``,
                                                                                       ``mlp.fc1``, ``mlp.fc2``
swin          ``...encoder.layers.N.blocks.M``               query, key, value         query/key/value/output
              (MedCLIP-ViT)                                  projections               projections, both MLP layers
resnet        ``...layerN.M`` (MedCLIP-RN50, GLoRIA)         ``conv1``-``conv3``       the same (the stem is left
                                                                                       alone)
============  =============================================  ========================  ===========================

A preset (:data:`PRESETS`) fixes the rest: ``study`` is the study's LoRA, the update added unscaled (peft's
``lora_alpha = r``, so its scaling alpha / r is 1 and delta W = B A) and the head reading the raw image embedding;
``embedkit`` is the wider layout with ``lora_alpha = 1`` (delta W = B A / r) and the head reading unit vectors.

Three peft (0.21) facts shape this module. (1) A LoRA on ``MultiheadAttention.out_proj`` targeted by name is
ignored in the forward pass (the attention never calls ``out_proj.forward``) yet merged by ``merge_and_unload``; the
target is ``attn`` and such targets (and ``all-linear``) are refused. (2) peft's ``MultiheadAttention`` LoRA merges
the adapter into the frozen weights before each forward and subtracts it afterwards, so ``(W + d) - d`` rounding
drifts the "frozen" weights on every step. (3) Its ``merge`` adds the out_proj delta twice (``W + 2d``; peft PR
#3774), in its forward pass and in ``merge_and_unload`` alike. :class:`ExactMultiheadAttention` fixes (2) and (3):
the forward uses ``W + d`` in temporary tensors and puts the original Parameters back (base weights stay
bit-identical), and ``merge`` adds each delta once, so a merged tower computes what the adapter tower computed.
peft cannot adapt a MultiheadAttention's in_proj alone (its LoRA always wraps out_proj too);
:class:`InProjMultiheadAttention` does, for the target ``attn.in_proj``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.lora.layer import MultiheadAttention as PeftLoraMultiheadAttention
from torch import nn

from embedkit.errors import EmbedkitError
from embedkit.models.base import TowerLayout

if TYPE_CHECKING:
    from embedkit.models.base import VisionLanguageModel


class LoraTargetError(EmbedkitError, ValueError):
    """LoRA targets that do not exist in the tower, or that peft would silently ignore."""


_SUPPORTED = (nn.Linear, nn.Conv2d, nn.MultiheadAttention)
IN_PROJ = ".in_proj"  # `attn.in_proj`: the input projection of the MultiheadAttention `attn` alone


@dataclass(frozen=True)
class LoraPreset:
    """What a LoRA preset fixes besides its targets (those are the family's: ``TowerLayout.targets(preset)``)."""

    name: str
    alpha_is_rank: bool  # peft's lora_alpha = r: scaling alpha / r = 1, the update B A added unscaled
    head_features: str  # what the head reads: "raw" (the image embedding before L2 normalisation) or "unit"

    def alpha(self, rank: int) -> float:
        """peft's ``lora_alpha`` for ``rank``."""
        return float(rank) if self.alpha_is_rank else 1.0


PRESETS = {"study": LoraPreset("study", alpha_is_rank=True, head_features="raw"),
           "embedkit": LoraPreset("embedkit", alpha_is_rank=False, head_features="unit")}


def _candidates(tower: nn.Module, layout: TowerLayout) -> list[str]:
    """Names of LoRA-able modules inside blocks, relative to their block (what --targets may name)."""
    modules = dict(tower.named_modules())
    seen: dict[str, None] = {}
    for name, module in modules.items():
        match = re.match(rf"({layout.block})\.(.+)$", name)
        inside_attention = isinstance(modules.get(name.rsplit(".", 1)[0]), nn.MultiheadAttention)
        if match and isinstance(module, _SUPPORTED) and not inside_attention:
            seen[match.group(2)] = None
            if isinstance(module, nn.MultiheadAttention):
                seen[match.group(2) + IN_PROJ] = None
    return list(seen)


def _in_proj_hits(modules: dict[str, nn.Module], layout: TowerLayout, target: str) -> list[str]:
    """``<attention>.in_proj`` for every MultiheadAttention ``target`` (``attn.in_proj``) names inside a block."""
    if not target.endswith(IN_PROJ):
        return []
    pattern = re.compile(rf"(?:{layout.block})\.{re.escape(target.removesuffix(IN_PROJ))}")
    return [n + IN_PROJ for n, m in modules.items() if pattern.fullmatch(n) and isinstance(m, nn.MultiheadAttention)]


def resolve_targets(tower: nn.Module, layout: TowerLayout, targets: list[str] | tuple[str, ...] | None = None,
                    preset: str = "study") -> list[str]:
    """Full module names of the tower that get LoRA: ``targets`` (or ``preset``'s defaults) inside every block.

    A target is a module name relative to a block (``attn``, ``mlp.fc1``, ``conv2``), or ``attn.in_proj`` for
    the input projection of the MultiheadAttention ``attn`` alone (returned as ``<block>.attn.in_proj``). User
    targets that match nothing, name an unsupported module type, or that peft would ignore (``out_proj`` of an
    attention, ``all-linear``) raise :class:`LoraTargetError`, as does one attention targeted both whole and by
    its in_proj; default targets a tower lacks (``conv3`` in a basic ResNet block) are skipped.
    """
    modules = dict(tower.named_modules())
    defaults = layout.targets(preset)
    chosen = list(targets) if targets else list(defaults)
    for target in chosen:
        if target == "all-linear":
            raise LoraTargetError(
                "--targets all-linear would put LoRA on attention out_proj layers, which peft ignores in the forward "
                "pass yet merges; name the modules instead (default for this tower: " + ",".join(defaults) + ")")
    found: list[str] = []
    for target in chosen:
        pattern = re.compile(rf"(?:{layout.block})\.{re.escape(target)}")
        hits = [n for n in modules if pattern.fullmatch(n)] or _in_proj_hits(modules, layout, target)
        if hits and hits[0] not in modules:  # `<attention>.in_proj`: a projection with no module of its own
            found += hits
            continue
        if not hits and targets:
            raise LoraTargetError(
                f"LoRA target '{target}' matches no module inside the {layout.kind} blocks of this tower; "
                f"modules there: {', '.join(_candidates(tower, layout))}")
        for name in hits:
            parent = modules.get(name.rsplit(".", 1)[0]) if "." in name else None
            if isinstance(parent, nn.MultiheadAttention):
                raise LoraTargetError(
                    f"LoRA target '{target}' is inside nn.MultiheadAttention ({name}): peft ignores such a LoRA in "
                    f"the forward pass yet merges it. Target the attention itself ('attn': in_proj and out_proj) or its "
                    f"in_proj alone ('attn.in_proj')")
            if not isinstance(modules[name], _SUPPORTED):
                raise LoraTargetError(
                    f"LoRA target '{target}' ({name}) is a {type(modules[name]).__name__}; LoRA applies to Linear, "
                    f"Conv2d and MultiheadAttention modules: {', '.join(_candidates(tower, layout))}")
        found += hits
    if not found:
        raise LoraTargetError(f"no LoRA target found in the {layout.kind} tower for {chosen}")
    twice = sorted(n for n in found if n.endswith(IN_PROJ) and n.removesuffix(IN_PROJ) in found)
    if twice:
        raise LoraTargetError(f"{twice[0].removesuffix(IN_PROJ)} is targeted both whole and by its in_proj; name "
                              "one of the two")
    order = list(modules).index
    return sorted(set(found), key=lambda n: (order(n.removesuffix(IN_PROJ)) if n not in modules else order(n)))


class ExactMultiheadAttention(PeftLoraMultiheadAttention):
    """peft's LoRA for nn.MultiheadAttention, with the forward pass and merge that LoRA means: ``W + d``, once.

    peft adds the adapter into ``in_proj_weight`` / ``out_proj.weight`` for the forward and subtracts it after,
    which rounds (the frozen weights drift by an ulp here and there on every step), and adds the out_proj delta
    twice. Here the forward's merged weights are temporary tensors and the original Parameters are put back as
    they were (gradients still reach lora_A/B through the temporary tensors); ``merge``/``unmerge`` (used by
    ``merge_and_unload``) add and remove each delta once.
    """

    adapts_out_proj = True  # peft's layout: LoRA on in_proj and (through peft's Linear) on out_proj

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the active adapters' deltas to ``in_proj_weight`` and (through peft's Linear) to ``out_proj``."""
        from peft.tuners.tuners_utils import check_adapters_to_merge

        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for adapter in adapter_names:
            if adapter not in self.lora_A:
                continue
            merged = base.in_proj_weight.data + self.get_delta_weight(adapter).to(base.in_proj_weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs in the merged weights: the adapter {adapter} seems to be broken")
            base.in_proj_weight.data = merged
            if self.adapts_out_proj:
                base.out_proj.merge(safe_merge=safe_merge, adapter_names=[adapter])  # adds the out_proj delta once
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract what :meth:`merge` added."""
        if not self.merged:
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.lora_A:
                base.in_proj_weight.data -= self.get_delta_weight(adapter).to(base.in_proj_weight.dtype)
        if self.adapts_out_proj:
            base.out_proj.unmerge()

    def forward(self, query: torch.Tensor, *args, **kwargs):
        active = [a for a in self.active_adapters if a in self.lora_A]
        if self.disable_adapters or self.merged or not active:
            return super().forward(query, *args, **kwargs)
        self._check_forward_args(query, *args, **kwargs)
        previous_dtype = query.dtype
        base = self.get_base_layer()
        swapped = [(base, "in_proj_weight", sum(self.get_delta_weight(a) for a in active))]
        if self.adapts_out_proj:
            out_lora = base.out_proj  # peft's Linear wrapping the attention's out_proj
            swapped.append((out_lora.get_base_layer(), "weight",
                            sum(out_lora.get_delta_weight(a) for a in active)))
        # MultiheadAttention reads these attributes directly (no Linear.forward), so they are swapped for the call.
        originals = [getattr(module, name) for module, name, _ in swapped]
        for (module, name, delta), weight in zip(swapped, originals):
            delattr(module, name)
            setattr(module, name, weight + delta.to(weight.dtype))
        try:
            result = base(query, *args, **kwargs)
        finally:
            for (module, name, _), weight in zip(swapped, originals):
                delattr(module, name)
                module.register_parameter(name, weight)
        return result[0].to(previous_dtype), (result[1].to(previous_dtype) if result[1] is not None else None)


class InProjMultiheadAttention(ExactMultiheadAttention):
    """LoRA on an nn.MultiheadAttention's input projection alone (the study's ViT layout, target ``attn.in_proj``).

    peft's MultiheadAttention LoRA always wraps ``out_proj`` in a LoRA Linear too; here ``out_proj`` stays the
    attention's own frozen Linear with no adapter, and forward and merge use ``in_proj_weight + delta`` only.
    """

    adapts_out_proj = False

    def __init__(self, base_layer: nn.MultiheadAttention, adapter_name: str, config, r: int = 0,
                 lora_alpha: float = 1, **kwargs) -> None:
        if not base_layer._qkv_same_embed_dim:
            raise ValueError("LoRA on in_proj needs one packed in_proj_weight (query, key and value of one size)")
        nn.Module.__init__(self)  # peft's __init__ is skipped: it would wrap out_proj
        LoraLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def update_layer(self, *args, **kwargs) -> None:
        """LoRA A and B for in_proj (peft's MultiheadAttention would add them to out_proj as well)."""
        LoraLayer.update_layer(self, *args, **kwargs)

    @property
    def out_proj(self) -> nn.Module:
        return self.get_base_layer().out_proj

    def _restore_weights(self) -> None:
        # peft re-registers in_proj_weight and out_proj's weight after its merge-forward-unmerge; this forward and
        # merge never unregister in_proj_weight, and out_proj is not wrapped.
        pass

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool, adapter_names: list[str] | None
                                           ) -> nn.MultiheadAttention:
        """The attention itself, with the in_proj delta merged when ``merge`` (what ``merge_and_unload`` calls)."""
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        return self.get_base_layer()


@dataclass
class LoraTower:
    """The peft LoraModel around an image tower (the tower is adapted in place), and what was targeted."""

    lora_model: nn.Module  # peft.LoraModel; merge_and_unload() returns the merged tower
    layout: TowerLayout
    preset: str
    modules: list[str]  # full module names that carry LoRA (``<attention>.in_proj``: its in_proj alone)
    targets: list[str]  # the target names (relative to a block): the preset's, or those asked for
    rank: int
    alpha: float  # peft's lora_alpha
    scaling: float  # what peft multiplies B A by (alpha / rank), read off its modules


def apply_lora(model: "VisionLanguageModel", rank: int, alpha: float | None = None, targets: list[str] | None = None,
               preset: str = "study") -> LoraTower:
    """Put LoRA (rank ``rank``, no dropout, no bias) on ``model``'s image tower in place, where its family's layout
    says for ``preset`` (or at ``targets``); only LoRA trains. ``alpha`` is peft's lora_alpha, by default the
    preset's (``study``: the rank, so delta W = B A; ``embedkit``: 1, so B A / rank).

    The adapter's random A matrices draw from torch's global RNG: seed it before calling for reproducible runs.
    """
    from peft import LoraConfig, LoraModel

    if rank < 1:
        raise LoraTargetError(f"LoRA rank must be at least 1, got {rank}")
    if preset not in PRESETS:
        raise LoraTargetError(f"LoRA preset must be one of {', '.join(PRESETS)}, not '{preset}'")
    tower, layout = model.image_tower(), model.lora_layout()
    if layout is None:
        raise LoraTargetError(f"no LoRA layout is known for the image tower {type(tower).__name__}: LoRA targets "
                              "cannot be chosen for it; use --method ft")
    alpha = PRESETS[preset].alpha(rank) if alpha is None else float(alpha)
    modules = resolve_targets(tower, layout, targets, preset)
    names = dict(tower.named_modules())
    in_proj_only = [m for m in modules if m not in names]
    if in_proj_only and any(isinstance(names.get(m), nn.MultiheadAttention) for m in modules):
        raise LoraTargetError("this tower's attentions are adapted one way: all whole (attn) or all by their in_proj "
                              "(attn.in_proj)")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                        target_modules=[m.removesuffix(IN_PROJ) if m in in_proj_only else m for m in modules])
    config._register_custom_module(
        {nn.MultiheadAttention: InProjMultiheadAttention if in_proj_only else ExactMultiheadAttention})
    lora_model = LoraModel(tower, config, "default")
    # one rank and one alpha for every module, so one scaling; read off peft's modules, not recomputed
    (scaling,) = {m.scaling["default"] for m in tower.modules() if isinstance(m, LoraLayer)}
    return LoraTower(lora_model, layout, preset, modules, list(targets) if targets else list(layout.targets(preset)),
                     rank, alpha, float(scaling))


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameter elements of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
