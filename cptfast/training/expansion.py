"""Block expansion (LLaMA-Pro): new decoder layers that start as the identity, inserted after
every ``every`` layers, so continued pretraining can add capacity for a domain while the old
layers stay as they were (the trainer trains only the new ones). A new layer is a copy of the
layer before it with its two output projections (attention's and the MLP's) zeroed: its
residual branches add exactly 0, so the model's outputs are unchanged at step 0. The model
stays a plain Hugging Face model with more layers (its config says how many)."""

from __future__ import annotations

import copy

import torch

from cptfast.errors import ConfigError

OUTPUT_PROJECTIONS = ("o_proj", "down_proj")  # the Llama-style names of every family we patch


def expand_layers(model, every: int) -> None:
    """Insert a new layer after each ``every`` layers of ``model`` (in place); only the new
    layers' parameters keep requiring gradients."""
    decoder = model.get_decoder()
    old = list(decoder.layers)
    if every < 1 or every > len(old):
        raise ConfigError(f"model.expand_layers.every must be in [1, {len(old)}] (the model's "
                          f"layers), got {every}")
    layer_types = getattr(model.config, "layer_types", None)
    layers, types, new = [], [], []
    for index, layer in enumerate(old):
        layers.append(layer)
        types.append(layer_types[index] if layer_types else None)
        if (index + 1) % every == 0:
            layers.append(_identity_copy(layer))
            types.append(types[-1])  # the same attention kind as its neighbour
            new.append(len(layers) - 1)
    for index, layer in enumerate(layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):  # the KV cache is indexed by it
                module.layer_idx = index
    decoder.layers = torch.nn.ModuleList(layers)
    model.config.num_hidden_layers = len(layers)
    if layer_types:
        model.config.layer_types = types
    trained = {id(p) for index in new for p in layers[index].parameters()}
    for parameter in model.parameters():  # old layers, embeddings, final norm, head: frozen
        parameter.requires_grad_(id(parameter) in trained)


def _identity_copy(layer):
    copied = copy.deepcopy(layer)
    zeroed = 0
    for name, module in copied.named_modules():
        if name.rsplit(".", 1)[-1] in OUTPUT_PROJECTIONS and isinstance(module, torch.nn.Linear):
            with torch.no_grad():
                module.weight.zero_()
                if module.bias is not None:
                    module.bias.zero_()
            zeroed += 1
    if zeroed != len(OUTPUT_PROJECTIONS):
        names = " and ".join(OUTPUT_PROJECTIONS)
        raise ConfigError(f"model.expand_layers needs decoder layers with {names} linear "
                          f"layers; {type(layer).__name__} has {zeroed} of them")
    return copied
