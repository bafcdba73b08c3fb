"""vtprune quickstart: merge tokens in a timm ViT, read the trace, and get the exact model back.

Runs offline on a CPU in a few seconds: the ViT has random weights (pretrained=False), so the logits
mean nothing semantically; the point is the mechanics. With real weights, use pretrained=True.

    python examples/quickstart.py

Exits with status 1 if removing a policy does not restore the model bit for bit.
"""
from __future__ import annotations

import sys

import timm
import torch

import vtprune


def attributes_of(model: torch.nn.Module) -> dict[str, set[str]]:
    """Instance attribute names of every sub-module (vtprune patches by adding instance attributes)."""
    return {name: set(vars(module)) for name, module in model.named_modules()}


def hooks_of(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {name: (len(module._forward_hooks), len(module._forward_pre_hooks))
            for name, module in model.named_modules()}


def main() -> int:
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    images = torch.randn(2, 3, 224, 224)
    print(vtprune.inspect(model), end="\n\n")

    with torch.no_grad():
        reference = model(images)
        state_before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        attributes_before, hooks_before = attributes_of(model), hooks_of(model)

        for policy in (vtprune.ToMe(r=16), vtprune.PiToMe(ratio=0.9)):
            handle = vtprune.apply(model, policy)
            logits = model(images)                       # the model's own API, unchanged
            trace = handle.trace
            agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
            cosine = torch.nn.functional.cosine_similarity(logits, reference, dim=-1).mean().item()
            print(f"policy {policy}")
            print(f"  tokens after each block: {trace.tokens()}")
            print(f"  final tokens {trace.final_tokens()} of {trace.tokens_in()[0]}; "
                  f"sizes sum to {handle.size[0].sum().item():.0f} original tokens per image")
            print(f"  logits vs unpruned model: top-1 agreement {agree:.0%}, mean cosine {cosine:.4f}"
                  "  (random weights: not an accuracy measure)")
            handle.remove()

        # The context manager removes the policy on exit, also when the body raises.
        with vtprune.applied(model, "tome:r=8") as handle:
            model(images)
            print(f"\nwith vtprune.applied(model, 'tome:r=8'): final tokens {handle.trace.final_tokens()}")

        restored = model(images)

    failures = []
    if not torch.equal(restored, reference):
        failures.append(f"logits differ after remove(): max |diff| {(restored - reference).abs().max().item():.3g}")
    state_after = model.state_dict()
    if state_after.keys() != state_before.keys() or any(
            not torch.equal(state_after[name], tensor) for name, tensor in state_before.items()):
        failures.append("the state dict changed")
    leftovers = [f"{name or 'model'}: {sorted(attributes ^ attributes_before[name])}"
                 for name, attributes in attributes_of(model).items() if attributes != attributes_before[name]]
    if hooks_of(model) != hooks_before:
        leftovers.append("hooks changed")
    if leftovers:
        failures.append(f"patches left behind: {', '.join(leftovers)}")
    if vtprune.handle_of(model) is not None:
        failures.append("the model still has an active handle")

    if failures:
        print("\nFAILED: " + "; ".join(failures), file=sys.stderr)
        return 1
    print("\nremoved: the model is restored bit for bit (same logits, same weights, no patches left)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
