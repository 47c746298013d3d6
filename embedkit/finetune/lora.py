"""LoRA on the image tower of every model family, through peft.

Which modules get LoRA is the family's fact: ``model.lora_layout()`` (embedkit/models/base.py ``TowerLayout``)
names the tower's repeated blocks and the default targets inside each; this module resolves user targets against
it, refuses targets peft would silently ignore, and wraps the tower. The layouts the families ship:

==============  ===============================================  ==========================================
layout          blocks                                           default targets inside each block
==============  ===============================================  ==========================================
openclip-vit    ``transformer.resblocks.N`` (OpenAI CLIP)        ``attn`` (nn.MultiheadAttention: in_proj and
                                                                 out_proj), ``mlp.c_fc``, ``mlp.c_proj``
timm-vit        ``trunk.blocks.N`` (BiomedCLIP)                  ``attn.qkv``, ``attn.proj``, ``mlp.fc1``,
                                                                 ``mlp.fc2``
swin            ``...encoder.layers.N.blocks.M`` (MedCLIP-ViT)   query/key/value/output projections and both
                                                                 MLP layers (transformers 5 or 4 names)
resnet          ``...layerN.M`` (MedCLIP-RN50, GLoRIA)           the bottleneck convolutions ``conv1``,
                                                                 ``conv2``, ``conv3`` (the stem is left alone)
==============  ===============================================  ==========================================

Three peft (0.21) facts shape this module. (1) A LoRA on ``MultiheadAttention.out_proj`` targeted by name is
ignored in the forward pass (the attention never calls ``out_proj.forward``) yet merged by ``merge_and_unload``; the
target is ``attn`` and such targets (and ``all-linear``) are refused. (2) peft's ``MultiheadAttention`` LoRA merges
the adapter into the frozen weights before each forward and subtracts it afterwards, so ``(W + d) - d`` rounding
drifts the "frozen" weights on every step. (3) Its ``merge`` adds the out_proj delta twice (``W + 2d``; peft PR
#3774), in its forward pass and in ``merge_and_unload`` alike. :class:`ExactMultiheadAttention` fixes (2) and (3):
the forward uses ``W + d`` in temporary tensors and puts the original Parameters back (base weights stay
bit-identical), and ``merge`` adds each delta once, so a merged tower computes what the adapter tower computed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from peft.tuners.lora.layer import MultiheadAttention as PeftLoraMultiheadAttention
from torch import nn

from embedkit.errors import EmbedkitError
from embedkit.models.base import TowerLayout

if TYPE_CHECKING:
    from embedkit.models.base import VisionLanguageModel


class LoraTargetError(EmbedkitError, ValueError):
    """LoRA targets that do not exist in the tower, or that peft would silently ignore."""


_SUPPORTED = (nn.Linear, nn.Conv2d, nn.MultiheadAttention)


def _candidates(tower: nn.Module, layout: TowerLayout) -> list[str]:
    """Names of LoRA-able modules inside blocks, relative to their block (what --targets may name)."""
    modules = dict(tower.named_modules())
    seen: dict[str, None] = {}
    for name, module in modules.items():
        match = re.match(rf"({layout.block})\.(.+)$", name)
        inside_attention = isinstance(modules.get(name.rsplit(".", 1)[0]), nn.MultiheadAttention)
        if match and isinstance(module, _SUPPORTED) and not inside_attention:
            seen[match.group(2)] = None
    return list(seen)


def resolve_targets(tower: nn.Module, layout: TowerLayout, targets: list[str] | tuple[str, ...] | None = None
                    ) -> list[str]:
    """Full module names of the tower that get LoRA: ``targets`` (or the layout's defaults) inside every block.

    A target is a module name relative to a block (``attn``, ``mlp.fc1``, ``conv2``). User targets that match
    nothing, name an unsupported module type, or that peft would ignore (``out_proj`` of an attention,
    ``all-linear``) raise :class:`LoraTargetError`; default targets a tower lacks (``conv3`` in a basic ResNet
    block) are skipped.
    """
    modules = dict(tower.named_modules())
    chosen = list(targets) if targets else list(layout.targets)
    for target in chosen:
        if target == "all-linear":
            raise LoraTargetError(
                "--targets all-linear would put LoRA on attention out_proj layers, which peft ignores in the forward "
                "pass yet merges; name the modules instead (default for this tower: " + ",".join(layout.targets) + ")")
    found: list[str] = []
    for target in chosen:
        pattern = re.compile(rf"(?:{layout.block})\.{re.escape(target)}")
        hits = [n for n in modules if pattern.fullmatch(n)]
        if not hits and targets:
            raise LoraTargetError(
                f"LoRA target '{target}' matches no module inside the {layout.kind} blocks of this tower; "
                f"modules there: {', '.join(_candidates(tower, layout))}")
        for name in hits:
            parent = modules.get(name.rsplit(".", 1)[0]) if "." in name else None
            if isinstance(parent, nn.MultiheadAttention):
                raise LoraTargetError(
                    f"LoRA target '{target}' is inside nn.MultiheadAttention ({name}): peft ignores such a LoRA in "
                    f"the forward pass yet merges it. Target the attention module itself ('attn')")
            if not isinstance(modules[name], _SUPPORTED):
                raise LoraTargetError(
                    f"LoRA target '{target}' ({name}) is a {type(modules[name]).__name__}; LoRA applies to Linear, "
                    f"Conv2d and MultiheadAttention modules: {', '.join(_candidates(tower, layout))}")
        found += hits
    if not found:
        raise LoraTargetError(f"no LoRA target found in the {layout.kind} tower for {chosen}")
    return sorted(set(found), key=list(modules).index)


class ExactMultiheadAttention(PeftLoraMultiheadAttention):
    """peft's LoRA for nn.MultiheadAttention, with the forward pass and merge that LoRA means: ``W + d``, once.

    peft adds the adapter into ``in_proj_weight`` / ``out_proj.weight`` for the forward and subtracts it after,
    which rounds (the frozen weights drift by an ulp here and there on every step), and adds the out_proj delta
    twice. Here the forward's merged weights are temporary tensors and the original Parameters are put back as
    they were (gradients still reach lora_A/B through the temporary tensors); ``merge``/``unmerge`` (used by
    ``merge_and_unload``) add and remove each delta once.
    """

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
        base.out_proj.unmerge()

    def forward(self, query: torch.Tensor, *args, **kwargs):
        active = [a for a in self.active_adapters if a in self.lora_A]
        if self.disable_adapters or self.merged or not active:
            return super().forward(query, *args, **kwargs)
        self._check_forward_args(query, *args, **kwargs)
        previous_dtype = query.dtype
        base = self.get_base_layer()
        out_lora = base.out_proj  # peft's Linear wrapping the attention's out_proj
        out_linear = out_lora.get_base_layer()
        w_in, w_out = base.in_proj_weight, out_linear.weight
        delta_in = sum(self.get_delta_weight(a) for a in active)
        delta_out = sum(out_lora.get_delta_weight(a) for a in active)
        # MultiheadAttention reads these attributes directly (no Linear.forward), so they are swapped for the call.
        del base.in_proj_weight
        del out_linear.weight
        base.in_proj_weight = w_in + delta_in.to(w_in.dtype)
        out_linear.weight = w_out + delta_out.to(w_out.dtype)
        try:
            result = base(query, *args, **kwargs)
        finally:
            del base.in_proj_weight
            del out_linear.weight
            base.register_parameter("in_proj_weight", w_in)
            out_linear.register_parameter("weight", w_out)
        return result[0].to(previous_dtype), (result[1].to(previous_dtype) if result[1] is not None else None)


@dataclass
class LoraTower:
    """The peft LoraModel around an image tower (the tower is adapted in place), and what was targeted."""

    lora_model: nn.Module  # peft.LoraModel; merge_and_unload() returns the merged tower
    layout: TowerLayout
    modules: list[str]  # full module names that carry LoRA
    targets: list[str]  # the target names (relative to a block) that were asked for
    rank: int
    alpha: float


def apply_lora(model: "VisionLanguageModel", rank: int, alpha: float, targets: list[str] | None = None
               ) -> LoraTower:
    """Put LoRA (rank ``rank``, alpha ``alpha``, no dropout, no bias) on ``model``'s image tower in place, where
    its family's layout says; only LoRA trains.

    The adapter's random A matrices draw from torch's global RNG: seed it before calling for reproducible runs.
    """
    from peft import LoraConfig, LoraModel

    if rank < 1:
        raise LoraTargetError(f"LoRA rank must be at least 1, got {rank}")
    tower, layout = model.image_tower(), model.lora_layout()
    if layout is None:
        raise LoraTargetError(f"no LoRA layout is known for the image tower {type(tower).__name__}: LoRA targets "
                              "cannot be chosen for it; use --method ft")
    modules = resolve_targets(tower, layout, targets)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=modules)
    config._register_custom_module({nn.MultiheadAttention: ExactMultiheadAttention})
    lora_model = LoraModel(tower, config, "default")
    return LoraTower(lora_model, layout, modules, list(targets) if targets else list(layout.targets), rank, alpha)


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameter elements of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
