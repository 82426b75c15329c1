"""Small CNN domain classifier: the offline feature extractor behind FID/IS/KID.

On 28x28 digits and clothes a classifier trained on the domain gives more meaningful features than
an ImageNet Inception, and needs no downloaded weights. Images enter as uint8 (N, C, H, W) and are
scaled to [-1, 1] here, the same range the diffusion model works in.
"""

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@dataclass(frozen=True)
class ClassifierConfig:
    in_channels: int = 1  # 1 for MNIST-like, 3 for CIFAR
    image_size: int = 28
    num_classes: int = 10
    width: int = 32  # channels of the first stage; doubled at each of the three stages
    feature_dim: int = 128  # size of the penultimate layer used as FID features
    dropout: float = 0.3


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, C, H, W) in [0, 255] -> float32 (N, C, H, W) in [-1, 1]."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"expected uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    return images.float() / 127.5 - 1.0


def _stage(c_in: int, c_out: int) -> nn.Sequential:
    """Two conv-bn-relu layers then a 2x downsample: (B, c_in, H, W) -> (B, c_out, H/2, W/2)."""
    layers = []
    for c in (c_in, c_out):
        layers += [nn.Conv2d(c, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.MaxPool2d(2))


class Classifier(nn.Module):
    """Three conv stages, global average pooling, one hidden layer (the features), a linear head."""

    def __init__(self, config: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        self.config = config
        w = config.width
        self.trunk = nn.Sequential(_stage(config.in_channels, w), _stage(w, 2 * w), _stage(2 * w, 4 * w))
        self.hidden = nn.Sequential(nn.Linear(4 * w, config.feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(config.feature_dim, config.num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations. x: float (B, C, H, W) in [-1, 1] -> (B, feature_dim)."""
        c, s = self.config.in_channels, self.config.image_size
        if tuple(x.shape[1:]) != (c, s, s):
            raise ValueError(f"expected input (B, {c}, {s}, {s}), got {tuple(x.shape)}")
        h = self.trunk(x)  # (B, 4w, s/8, s/8)
        return self.hidden(h.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits. x: float (B, C, H, W) in [-1, 1] -> (B, num_classes)."""
        return self.head(self.features(x))


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Switch to eval mode for the block and restore the caller's mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _check_labelled(images: torch.Tensor, labels: torch.Tensor) -> None:
    if labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
        raise ValueError(f"expected int64 labels ({images.shape[0]},), got {labels.dtype} {tuple(labels.shape)}")


def train_classifier(model: Classifier, images: torch.Tensor, labels: torch.Tensor, *, epochs: int, lr: float,
                     batch_size: int, seed: int, device: str | torch.device = "cpu", weight_decay: float = 0.05,
                     progress: bool = True) -> list[float]:
    """Train in place with AdamW and a one-cycle schedule; return the mean loss of each epoch.

    images: uint8 (N, C, H, W); labels: int64 (N,). Shuffling and dropout draw from a private RNG
    seeded with `seed`, so on the CPU the same seed gives the same weights; the global RNG is untouched.
    """
    _check_labelled(images, labels)
    device = torch.device(device)
    model.to(device).train()
    steps_per_epoch = -(-len(images) // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    losses = []
    with torch.random.fork_rng(devices=cuda_devices), tqdm(total=epochs * steps_per_epoch, disable=not progress,
                                                          desc="classifier", unit="step") as bar:
        torch.manual_seed(seed)
        for _ in range(epochs):
            total = 0.0
            for idx in torch.randperm(len(images), generator=generator).split(batch_size):
                x = to_unit_range(images[idx]).to(device)
                loss = F.cross_entropy(model(x), labels[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(idx)
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.4f}")
            losses.append(total / len(images))
    return losses


@torch.no_grad()
def predict(model: Classifier, images: torch.Tensor, *, batch_size: int = 512,
            device: str | torch.device = "cpu") -> torch.Tensor:
    """Logits of uint8 images (N, C, H, W) -> float32 (N, num_classes) on the CPU.

    Runs in eval mode (the caller's mode is restored) on `device`, where the model is moved.
    """
    model.to(device)
    with _eval_mode(model):
        chunks = [model(to_unit_range(x).to(device)).float().cpu() for x in images.split(batch_size)]
    return torch.cat(chunks) if chunks else torch.empty(0, model.config.num_classes)


def accuracy(model: Classifier, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 512,
             device: str | torch.device = "cpu") -> float:
    """Fraction of uint8 images (N, C, H, W) whose arg-max prediction equals the int64 label (N,).

    The model is moved to `device`.
    """
    _check_labelled(images, labels)
    logits = predict(model, images, batch_size=batch_size, device=device)
    return (logits.argmax(dim=1) == labels).float().mean().item()


def fit_classifier(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                   num_classes: int, *, width: int, epochs: int, lr: float, batch_size: int, seed: int,
                   device: str | torch.device = "cpu") -> tuple[Classifier, list[float], float]:
    """A classifier of `width` trained on uint8 (images, labels) `train`: (model, loss per epoch, accuracy
    on `test`). The same seed gives the same weights."""
    (images, labels), device = train, torch.device(device)
    torch.manual_seed(seed)
    config = ClassifierConfig(in_channels=images.shape[1], image_size=images.shape[2], num_classes=num_classes,
                              width=width)
    model = Classifier(config)
    losses = train_classifier(model, images, labels, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                              device=device)
    return model, losses, accuracy(model, *test, device=device)
