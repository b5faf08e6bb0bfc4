"""Train and export the bundled demo models, with fixed seeds, so they can be rebuilt at will.

Usage: python tools/train_demo_models.py   (needs the `ref` extra: torch, scikit-learn)

- shapes: a small ResNet (3x64x64 normalised input, BatchNorm, one max-pool, 3 residual blocks,
  global average pool) on procedural images from xaid_server.demo.shapes.
- tabular: an MLP on scikit-learn's breast-cancer data, standardisation inside the graph so that
  it takes raw feature values.
- text: token ids -> embedding -> 1-D convolution -> masked mean -> linear, on sentences from
  xaid_server.demo.reviews (`--only text` trains it alone).

Writes service/xaid_server/demo/models/{shapes,tabular,text}/ (model.onnx in version folder 1 and
config.yaml) and service/xaid_server/demo/examples/. Each export is checked against torch with
onnxruntime before it is written.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import torch
import yaml
from PIL import Image
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "service"))
sys.path.insert(0, str(ROOT))

from bench.small_resnet import SmallResNet, write_onnx  # noqa: E402  (the benchmarks' reference CNN)
from xaid_server.demo import reviews, shapes  # noqa: E402
from xaid_server.model_config import load_config  # noqa: E402
from xaid_server.tokens import tokenize  # noqa: E402

DEMO = ROOT / "service" / "xaid_server" / "demo"
TOLERANCE = 1e-4  # onnxruntime against torch, max abs difference of the logits

# Seeds: one per purpose, so that test data can never overlap training data.
SHAPES_TRAIN_SEED = 1
SHAPES_TEST_SEED = 2
SHAPES_EXAMPLES_SEED = 3
TORCH_SEED = 0
TABULAR_SPLIT_SEED = 0
TABULAR_BACKGROUND_ROWS = 100  # KernelSHAP's reference rows, drawn from the training split
TEXT_TRAIN_SEED = 4
TEXT_TEST_SEED = 5
TEXT_EXAMPLES_SEED = 6

SIZE = 64
SHAPES_WIDTHS = (16, 16, 32, 64)  # a quarter of the benchmark model's compute
TRAIN_IMAGES = 40_000
TEST_IMAGES = 2_000
EPOCHS = 6
BATCH = 64
EXAMPLE_CLASSES = ("circle", "star", "cross", "heart")
PATCH_CHANCES = (0.6, 0.3)  # of a first and a second occluding square per training image
PATCH_SIDE = (6, 16)
SCATTER_CHANCE = 0.3  # of hiding a random share of single pixels in a training image
SCATTER_SHARE = (0.05, 0.95)  # the range that share is drawn from
CORE_DEPTH = 12  # depth weights stop growing this many pixels inside the object
OCCLUSION_WINDOW = 8
OCCLUSION_STRIDE = 4
TEXT_SENTENCES = 20_000
TEXT_MAX_LENGTH = 32
TEXT_UNKNOWN_RATE = 0.05  # words replaced by the unknown id in training, for unseen words


class StandardisedMLP(nn.Module):
    """(x - mean) / std with the training statistics as constants, then a two-layer MLP."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: npt.NDArray[np.float64], std: npt.NDArray[np.float64]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))
        features = len(mean)
        self.net = nn.Sequential(
            nn.Linear(features, 32),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(32, 16),
            nn.ReLU(),
            nn.Linear(16, 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.net((x - self.mean) / self.std)
        return logits


class TextCNN(nn.Module):
    """Embedding (pad embeds to zero) -> Conv1d(3) -> ReLU -> mean over real tokens -> linear.

    The convolution sees a word with its neighbours, so "not good" can differ from "good".
    """

    def __init__(self, vocabulary: int, classes: int, pad_id: int = 0) -> None:
        super().__init__()
        self.pad_id = pad_id
        self.embedding = nn.Embedding(vocabulary, 16, padding_idx=pad_id)
        self.conv = nn.Conv1d(16, 32, 3, padding=1)
        self.out = nn.Linear(32, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != self.pad_id).unsqueeze(1).float()
        hidden = torch.relu(self.conv(self.embedding(ids).transpose(1, 2))) * mask
        logits: torch.Tensor = self.out(hidden.sum(2) / mask.sum(2).clamp(min=1.0))
        return logits


def log(message: str) -> None:
    print(message, flush=True)


def normalise(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 NCHW -> float32 (x / 255 - mean) / std, as the server's preprocessing does."""
    return (images.float() / 255.0 - mean) / std


def to_nchw(images: npt.NDArray[np.uint8]) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def generate_chunked(
    seed: int, n: int, chunk: int = 2_000
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    rng = np.random.default_rng(seed)
    parts = [shapes.generate(rng, min(chunk, n - start), SIZE) for start in range(0, n, chunk)]
    return (
        np.concatenate([p[0] for p in parts]),
        np.concatenate([p[1] for p in parts]),
        np.concatenate([p[2] for p in parts]),
    )


def pixel_statistics(images: npt.NDArray[np.uint8]) -> tuple[float, float]:
    """Mean and std of all pixel values / 255, rounded to 4 places (as written in the config)."""
    counts = np.bincount(images.ravel(), minlength=256).astype(np.float64)
    values = np.arange(256) / 255.0
    mean = float(counts @ values / counts.sum())
    std = float(np.sqrt(counts @ (values - mean) ** 2 / counts.sum()))
    return round(mean, 4), round(std, 4)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random flip and quarter turn per batch: every class is closed under both."""
    turns = int(torch.randint(0, 4, (1,), generator=generator))
    if int(torch.randint(0, 2, (1,), generator=generator)):
        x = x.flip(3)
    return torch.rot90(x, turns, dims=(2, 3))


def core_weights(masks: npt.NDArray[np.bool_], chunk: int = 4_096) -> torch.Tensor:
    """Per object pixel, its chessboard depth inside the object (1 on the outline), as uint8."""
    out = torch.empty(masks.shape, dtype=torch.uint8)
    for start in range(0, len(masks), chunk):
        inside = torch.from_numpy(masks[start : start + chunk]).float()[:, None]
        depth = inside.clone()
        for _ in range(CORE_DEPTH - 1):
            inside = -nn.functional.max_pool2d(-inside, 3, 1, 1)  # erode by one pixel
            depth += inside
        out[start : start + chunk] = depth[:, 0].to(torch.uint8)
    return out


def occlude(
    x: torch.Tensor, weights: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste baseline-coloured (0.0) squares on part of the batch, half of them on the object,
    and hide a random share of single pixels in part of it.

    The target keeps only the visible share of the object's confidence (the rest is spread over
    all classes), pixels weighted by their squared depth inside the object, so the logit tracks
    how much of the object's body is seen: occlusion explanations then peak inside the object
    rather than on an outline feature such as a corner, or on the background. Scattered pixels
    teach the same for the removal a deletion curve makes (METHODS.md, faithfulness): without
    them, pixels removed in a random order were out of the training distribution and lowered
    the target more than removing the object itself.
    """
    masks = weights > 0
    batch, _, height, width = x.shape
    rows = torch.arange(height).view(1, height, 1)
    cols = torch.arange(width).view(1, 1, width)
    covered = torch.zeros(batch, height, width, dtype=torch.bool)
    for chance in PATCH_CHANCES:
        side = torch.randint(PATCH_SIDE[0], PATCH_SIDE[1] + 1, (batch,), generator=generator)
        on_object = torch.multinomial(masks.view(batch, -1).float(), 1, generator=generator)[:, 0]
        anywhere = torch.randint(0, height * width, (batch,), generator=generator)
        use_object = torch.rand(batch, generator=generator) < 0.5
        centre = torch.where(use_object, on_object, anywhere)
        top = (centre // width - side // 2).view(batch, 1, 1)
        left = (centre % width - side // 2).view(batch, 1, 1)
        side = side.view(batch, 1, 1)
        box = (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)
        used = (torch.rand(batch, generator=generator) < chance).view(batch, 1, 1)
        covered |= box & used
    scattered = torch.rand(batch, 1, 1, generator=generator) < SCATTER_CHANCE
    low, high = SCATTER_SHARE
    share = low + (high - low) * torch.rand(batch, 1, 1, generator=generator)
    covered |= scattered & (torch.rand(batch, height, width, generator=generator) < share)
    weight = weights.float() ** 2
    visible = 1.0 - (weight * covered).sum((1, 2)) / weight.sum((1, 2)).clamp(min=1)
    classes = len(shapes.CLASSES)
    onehot = nn.functional.one_hot(labels, classes).float()
    targets = onehot * visible[:, None] + (1.0 - visible[:, None]) / classes
    return x.masked_fill(covered[:, None], 0.0), targets


def predict(model: nn.Module, x: torch.Tensor, batch: int = 500) -> npt.NDArray[np.float32]:
    model.eval()
    with torch.no_grad():
        out = [model(x[i : i + batch]).numpy() for i in range(0, len(x), batch)]
    return np.concatenate(out).astype(np.float32)


def export(model: nn.Module, example: torch.Tensor, path: Path) -> ort.InferenceSession:
    """Export to ONNX (opset 17, dynamic batch), check it, and match onnxruntime against torch."""
    model.eval()
    write_onnx(model, example, path, producer="xaid tools/train_demo_models.py")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(TORCH_SEED)
    for batch in (1, 7):
        index = torch.randint(0, len(example), (batch,), generator=generator)
        x = example[index]
        with torch.no_grad():
            expected = model(x).numpy()
        (actual,) = session.run(["logits"], {"input": x.numpy()})
        diff = float(np.abs(np.asarray(actual) - expected).max())
        if diff >= TOLERANCE:
            raise SystemExit(f"{path}: onnxruntime differs from torch by {diff} at batch {batch}")
        log(f"  onnxruntime == torch at batch {batch} (max abs diff {diff:.2e})")
    return session


def occlusion_map(
    session: ort.InferenceSession, x: npt.NDArray[np.float32], target: int
) -> npt.NDArray[np.float64]:
    """Mean logit drop over the 8x8 windows (stride 4, baseline 0.0) covering each pixel."""
    _, height, width = x.shape
    starts = [
        (top, left)
        for top in range(0, height - OCCLUSION_WINDOW + 1, OCCLUSION_STRIDE)
        for left in range(0, width - OCCLUSION_WINDOW + 1, OCCLUSION_STRIDE)
    ]
    batch = np.repeat(x[None], len(starts), axis=0)
    for k, (top, left) in enumerate(starts):
        batch[k, :, top : top + OCCLUSION_WINDOW, left : left + OCCLUSION_WINDOW] = 0.0
    (base,) = session.run(["logits"], {"input": x[None]})
    (occluded,) = session.run(["logits"], {"input": batch})
    drops = float(np.asarray(base)[0, target]) - np.asarray(occluded)[:, target]
    total = np.zeros((height, width))
    count = np.zeros((height, width))
    for drop, (top, left) in zip(drops, starts, strict=True):
        total[top : top + OCCLUSION_WINDOW, left : left + OCCLUSION_WINDOW] += drop
        count[top : top + OCCLUSION_WINDOW, left : left + OCCLUSION_WINDOW] += 1
    result: npt.NDArray[np.float64] = total / np.maximum(count, 1)
    return result


class BlockList(list[str]):
    """A list written one item per line (feature names are long and contain spaces)."""


class ConfigDumper(yaml.SafeDumper):
    """Flow style for lists of numbers, block style for BlockList."""


def _represent_block_list(dumper: yaml.SafeDumper, data: BlockList) -> yaml.Node:
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=False)


ConfigDumper.add_representer(BlockList, _represent_block_list)


def write_config(path: Path, header: str, config: dict[str, Any]) -> None:
    text = yaml.dump(
        config, Dumper=ConfigDumper, sort_keys=False, default_flow_style=None, width=100
    )
    path.write_text(header + text, encoding="utf-8")
    load_config(path)  # the server must accept what was written


def rounded(values: Any, digits: int = 6) -> list[Any]:
    """Plain Python floats with a few significant digits, for a readable config."""
    array = np.asarray(values, dtype=np.float64)
    return [rounded(row, digits) if array.ndim > 1 else float(f"{row:.{digits}g}") for row in array]


def train_shapes(epochs: int, train_images: int) -> None:
    log("shapes: generating data")
    started = time.perf_counter()
    images, labels, masks = generate_chunked(SHAPES_TRAIN_SEED, train_images)
    test_images, test_labels, test_masks = generate_chunked(SHAPES_TEST_SEED, TEST_IMAGES)
    # One mean and std over all channels: colours are random, so no channel is special.
    mean, std = pixel_statistics(images)
    x_train, y_train = to_nchw(images), torch.from_numpy(labels)
    w_train = core_weights(masks)
    del masks
    x_test = normalise(to_nchw(test_images), mean, std)
    log(f"  {train_images} + {TEST_IMAGES} images in {time.perf_counter() - started:.1f}s")

    torch.manual_seed(TORCH_SEED)
    generator = torch.Generator().manual_seed(TORCH_SEED)
    model = SmallResNet(len(shapes.CLASSES), widths=SHAPES_WIDTHS)
    steps_per_epoch = train_images // BATCH
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=2e-3, total_steps=epochs * steps_per_epoch, pct_start=0.2
    )
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        model.train()
        started = time.perf_counter()
        order = torch.randperm(train_images, generator=generator)
        total = 0.0
        for step in range(steps_per_epoch):
            index = order[step * BATCH : (step + 1) * BATCH]
            x = normalise(x_train[index], mean, std)
            x, targets = occlude(x, w_train[index], y_train[index], generator)
            loss = loss_fn(model(augment(x, generator)), targets)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.item()
        accuracy = float((predict(model, x_test).argmax(1) == test_labels).mean())
        log(
            f"  epoch {epoch + 1}/{epochs}: loss {total / steps_per_epoch:.4f}, "
            f"test accuracy {accuracy:.4f} ({time.perf_counter() - started:.0f}s)"
        )

    folder = DEMO / "models" / "shapes"
    session = export(model, x_test[:64], folder / "1" / "model.onnx")
    (logits,) = session.run(["logits"], {"input": x_test.numpy()})
    accuracy = float((np.asarray(logits).argmax(1) == test_labels).mean())
    log(f"  onnxruntime test accuracy {accuracy:.4f} on {TEST_IMAGES} fresh images")
    if accuracy < 0.95:
        raise SystemExit(f"shapes accuracy {accuracy:.4f} is below 0.95")
    hits = [
        bool(test_masks[i].flat[int(np.argmax(occlusion_map(session, x, int(test_labels[i]))))])
        for i, x in enumerate(x_test[:100].numpy())
    ]
    log(f"  pointing game (occlusion 8x8/4): {np.mean(hits):.2f} on 100 test images")
    if np.mean(hits) < 0.9:
        raise SystemExit("occlusion maxima miss the object too often")

    lo, hi = (0.0 - mean) / std, (1.0 - mean) / std
    write_config(
        folder / "config.yaml",
        f"# Generated by tools/train_demo_models.py (data seed {SHAPES_TRAIN_SEED}, "
        f"torch seed {TORCH_SEED}).\n",
        {
            "kind": "image",
            "input": "input",
            "output": "logits",
            "labels": list(shapes.CLASSES),
            "max_batch_size": 64,
            "baseline": 0.0,
            "input_range": rounded([lo, hi]),
            "image": {
                "height": SIZE,
                "width": SIZE,
                "channels": 3,
                "layout": "NCHW",
                "scale": 255.0,
                "mean": [mean] * 3,
                "std": [std] * 3,
            },
            "defaults": {
                "occlusion": {
                    "window": [OCCLUSION_WINDOW, OCCLUSION_WINDOW],
                    "stride": [OCCLUSION_STRIDE, OCCLUSION_STRIDE],
                }
            },
        },
    )
    write_examples(session, mean, std)


def write_examples(session: ort.InferenceSession, mean: float, std: float) -> None:
    """One PNG per example class: confidently right, and occlusion points at the object."""
    folder = DEMO / "examples"
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.png"):
        stale.unlink()
    images, labels, masks = shapes.generate(np.random.default_rng(SHAPES_EXAMPLES_SEED), 200, SIZE)
    x_all = normalise(to_nchw(images), mean, std).numpy()
    (logits,) = session.run(["logits"], {"input": x_all})
    logits = np.asarray(logits)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for name in EXAMPLE_CLASSES:
        target = shapes.CLASSES.index(name)
        for i in np.flatnonzero(labels == target):
            if probs[i].argmax() != target or probs[i, target] < 0.9:
                continue
            if not masks[i].flat[int(np.argmax(occlusion_map(session, x_all[i], target)))]:
                continue
            Image.fromarray(images[i]).save(folder / f"{name}.png", optimize=True)
            log(f"  example {name}.png (p={probs[i, target]:.3f})")
            break
        else:
            raise SystemExit(f"no good example image for {name}")


def tabular_split() -> tuple[Any, list[npt.NDArray[Any]]]:
    """The breast-cancer data and its seeded split: x_train, x_test, y_train, y_test."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    data = load_breast_cancer()
    x = np.asarray(data.data, dtype=np.float64)
    y = np.asarray(data.target, dtype=np.int64)
    split = train_test_split(x, y, test_size=0.2, stratify=y, random_state=TABULAR_SPLIT_SEED)
    return data, split


def write_tabular_background() -> Path:
    """Background rows for KernelSHAP, a seeded draw from the training split (no training)."""
    _, (x_train, *_) = tabular_split()
    rng = np.random.default_rng(TABULAR_SPLIT_SEED)
    rows = np.sort(rng.choice(len(x_train), TABULAR_BACKGROUND_ROWS, replace=False))
    path = DEMO / "models" / "tabular" / "background.npy"
    np.save(path, x_train[rows].astype(np.float32))
    return path


def train_tabular() -> None:
    log("tabular: breast cancer")
    data, (x_train, x_test, y_train, y_test) = tabular_split()
    x = np.asarray(data.data, dtype=np.float64)
    y = np.asarray(data.target, dtype=np.int64)
    mean, std = x_train.mean(0), x_train.std(0)
    torch.manual_seed(TORCH_SEED)
    model = StandardisedMLP(mean, std)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    xt = torch.tensor(x_train, dtype=torch.float32)
    yt = torch.from_numpy(y_train)
    generator = torch.Generator().manual_seed(TORCH_SEED)
    for _ in range(150):
        model.train()
        order = torch.randperm(len(xt), generator=generator)
        for start in range(0, len(xt), 64):
            index = order[start : start + 64]
            loss = loss_fn(model(xt[index]), yt[index])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    x_test32 = torch.tensor(x_test, dtype=torch.float32)
    train_accuracy = float((predict(model, xt).argmax(1) == y_train).mean())
    log(f"  torch train accuracy {train_accuracy:.4f}")

    folder = DEMO / "models" / "tabular"
    session = export(model, x_test32, folder / "1" / "model.onnx")
    (logits,) = session.run(["logits"], {"input": x_test32.numpy()})
    accuracy = float((np.asarray(logits).argmax(1) == y_test).mean())
    log(f"  onnxruntime test accuracy {accuracy:.4f} on {len(y_test)} held-out rows")
    (logits,) = session.run(["logits"], {"input": x.astype(np.float32)})
    whole = float((np.asarray(logits).argmax(1) == y).mean())
    log(f"  onnxruntime accuracy {whole:.4f} on all {len(y)} rows")

    write_config(
        folder / "config.yaml",
        f"# Generated by tools/train_demo_models.py (split seed {TABULAR_SPLIT_SEED}, "
        f"torch seed {TORCH_SEED}).\n"
        "# Feature statistics are in raw units, from the training split.\n",
        {
            "kind": "tabular",
            "input": "input",
            "output": "logits",
            "labels": [str(name) for name in data.target_names],
            "max_batch_size": 64,
            "features": {
                "names": BlockList(str(name) for name in data.feature_names),
                "mean": rounded(mean),
                "std": rounded(std),
                "min": rounded(x_train.min(0)),
                "max": rounded(x_train.max(0)),
                "quartiles": rounded(np.percentile(x_train, [25, 50, 75], axis=0).T),
            },
            "background": write_tabular_background().name,
            "defaults": {"occlusion": {"window": [1], "stride": [1]}},
        },
    )
    examples = DEMO / "examples"
    examples.mkdir(parents=True, exist_ok=True)
    np.save(examples / "tabular.npy", x_test[:5].astype(np.float32))


def text_ids(sentences: list[str], index: dict[str, int], length: int) -> torch.Tensor:
    """Token ids [n, length], padded with 0, as the server encodes text."""
    ids = torch.zeros((len(sentences), length), dtype=torch.int64)
    for row, sentence in enumerate(sentences):
        tokens = tokenize(sentence)[:length]
        ids[row, : len(tokens)] = torch.tensor([index.get(t, 1) for t in tokens])
    return ids


def train_text() -> None:
    log("text: generated reviews")
    vocabulary = reviews.vocabulary()
    index = {token: i for i, token in enumerate(vocabulary)}
    sentences, labels = reviews.generate(np.random.default_rng(TEXT_TRAIN_SEED), TEXT_SENTENCES)
    test_sentences, test_labels = reviews.generate(np.random.default_rng(TEXT_TEST_SEED), 2_000)
    x_train = text_ids(sentences, index, TEXT_MAX_LENGTH)
    x_test = text_ids(test_sentences, index, TEXT_MAX_LENGTH)
    y_train = torch.from_numpy(labels)
    torch.manual_seed(TORCH_SEED)
    generator = torch.Generator().manual_seed(TORCH_SEED)
    model = TextCNN(len(vocabulary), len(reviews.LABELS))
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(4):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        for start in range(0, len(x_train), 64):
            batch = order[start : start + 64]
            x = x_train[batch]
            unknown = (torch.rand(x.shape, generator=generator) < TEXT_UNKNOWN_RATE) & (x > 0)
            loss = loss_fn(model(x.masked_fill(unknown, 1)), y_train[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        accuracy = float((predict(model, x_test).argmax(1) == test_labels).mean())
        log(f"  epoch {epoch + 1}: test accuracy {accuracy:.4f}")

    folder = DEMO / "models" / "text"
    # a fixed sequence length: the gradient graphs need static dims besides the batch
    session = export(model, x_test[:64], folder / "1" / "model.onnx")
    (logits,) = session.run(["logits"], {"input": x_test.numpy()})
    accuracy = float((np.asarray(logits).argmax(1) == test_labels).mean())
    log(f"  onnxruntime test accuracy {accuracy:.4f} on {len(test_labels)} fresh sentences")
    if accuracy < 0.98:
        raise SystemExit(f"text accuracy {accuracy:.4f} is below 0.98")
    (folder / "vocab.txt").write_text("\n".join(vocabulary) + "\n", encoding="utf-8")
    write_config(
        folder / "config.yaml",
        f"# Generated by tools/train_demo_models.py (data seed {TEXT_TRAIN_SEED}, "
        f"torch seed {TORCH_SEED}).\n",
        {
            "kind": "text",
            "input": "input",
            "output": "logits",
            "labels": list(reviews.LABELS),
            "max_batch_size": 64,
            "baseline": 0.0,
            "text": {
                "vocabulary": "vocab.txt",
                "pad_id": 0,
                "unk_id": 1,
                "max_length": TEXT_MAX_LENGTH,
            },
            "defaults": {"occlusion": {"window": [1], "stride": [1]}},
        },
    )
    examples, _ = reviews.generate(np.random.default_rng(TEXT_EXAMPLES_SEED), 4)
    (DEMO / "examples" / "reviews.txt").write_text("\n".join(examples) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--train-images", type=int, default=TRAIN_IMAGES)
    parser.add_argument("--skip-shapes", action="store_true")
    parser.add_argument("--skip-tabular", action="store_true")
    parser.add_argument("--skip-text", action="store_true")
    parser.add_argument(
        "--only", choices=("shapes", "tabular", "text"), help="train this model alone"
    )
    parser.add_argument(
        "--tabular-background",
        action="store_true",
        help="only write the tabular model's background rows (no training)",
    )
    args = parser.parse_args(argv)
    if args.tabular_background:
        log(f"wrote {write_tabular_background().relative_to(ROOT)}")
        return 0
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 8)))
    started = time.perf_counter()
    if not args.skip_tabular and args.only in (None, "tabular"):
        train_tabular()
    if not args.skip_shapes and args.only in (None, "shapes"):
        train_shapes(args.epochs, args.train_images)
    if not args.skip_text and args.only in (None, "text"):
        train_text()
    for path in sorted((DEMO / "models").rglob("model.onnx")):
        log(f"{path.relative_to(ROOT)}: {path.stat().st_size / 1024:.0f} KiB")
    log(f"done in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
