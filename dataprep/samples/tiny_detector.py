"""A tiny single-stage person detector with torchvision's detection contract, in plain torch.

The torch backend of dataprep.samples.detection runs any `module:callable` with that contract (torchvision's
Faster / Keypoint R-CNN included). This one is the project's own: small enough for tests and CPU
benches with random weights (`save_random_weights`), and it needs no torchvision: the CPU torch
build this project pins has no matching torchvision wheel on PyPI (theirs link CUDA's libtorch),
so box decoding and non-maximum suppression are written here in torch ops.

    images (list of CHW float in [0, 1]) -> padded batch -> 4 stride-2 conv blocks (stride 16)
    -> per cell: objectness logit + log-distances to the box's left, top, right, bottom edges
    -> sigmoid scores, boxes, per-image NMS -> [{"boxes" (N, 4) xyxy, "scores", "labels"}]
"""
from __future__ import annotations

import os

import torch
from torch import nn

STRIDE = 16


class TinyPersonDetector(nn.Module):
    def __init__(self, width: int = 16, max_detections: int = 50, min_score: float = 0.05,
                 nms_iou: float = 0.5, max_side: int = 512):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        blocks = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            blocks += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        self.backbone = nn.Sequential(*blocks)
        self.head = nn.Conv2d(chans[-1], 5, 1)
        self.max_detections, self.min_score, self.nms_iou, self.max_side = max_detections, min_score, nms_iou, max_side

    def forward(self, images: list[torch.Tensor]) -> list[dict]:
        if not images:
            return []
        scales = [min(1.0, self.max_side / max(im.shape[-2:])) for im in images]
        images = [im if s == 1.0 else nn.functional.interpolate(im[None], scale_factor=s, mode="bilinear",
                                                                 antialias=True)[0]
                  for im, s in zip(images, scales)]
        # one padded batch: sides rounded up to the stride (the padding is black, like a border)
        h = -(-max(im.shape[-2] for im in images) // STRIDE) * STRIDE
        w = -(-max(im.shape[-1] for im in images) // STRIDE) * STRIDE
        batch = images[0].new_zeros((len(images), 3, h, w))
        for i, im in enumerate(images):
            batch[i, :, :im.shape[-2], :im.shape[-1]] = im
        out = self.head(self.backbone(batch))                  # (B, 5, h/16, w/16)
        gy, gx = torch.meshgrid(torch.arange(out.shape[2], device=out.device),
                                torch.arange(out.shape[3], device=out.device), indexing="ij")
        cx, cy = (gx.flatten() + 0.5) * STRIDE, (gy.flatten() + 0.5) * STRIDE
        results = []
        for i, (im, s) in enumerate(zip(images, scales)):
            scores = out[i, 0].flatten().sigmoid()
            dist = out[i, 1:].flatten(1).clamp(-4, 4).exp() * (4 * STRIDE)     # (4, cells)
            boxes = torch.stack([cx - dist[0], cy - dist[1], cx + dist[2], cy + dist[3]], dim=1)
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, im.shape[-1])
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, im.shape[-2])
            keep = scores >= self.min_score
            boxes, scores = boxes[keep], scores[keep]
            order = scores.argsort(descending=True)[:4 * self.max_detections]
            kept = nms(boxes[order], self.nms_iou)[:self.max_detections]
            idx = order[kept]
            results.append({"boxes": boxes[idx] / s, "scores": scores[idx],
                            "labels": torch.ones(len(idx), dtype=torch.int64, device=out.device)})
        return results


def nms(boxes: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression of boxes sorted by score: indices of the kept ones."""
    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    lt = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    rb = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    iou = inter / (area[:, None] + area[None, :] - inter).clamp(min=1e-9)
    suppressed = torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)
    keep = []
    for k in range(len(boxes)):          # at most 4 x max_detections candidates
        if suppressed[k]:
            continue
        keep.append(k)
        suppressed |= iou[k] > iou_threshold
    return torch.tensor(keep, dtype=torch.int64, device=boxes.device)


def tiny_person_detector(**kwargs) -> TinyPersonDetector:
    """The `module:callable` of dataprep.samples.detection's torch backend (default detector.model)."""
    return TinyPersonDetector(**kwargs)


def save_random_weights(path: str, seed: int = 0, **kwargs) -> str:
    """A randomly initialised TinyPersonDetector's state dict as safetensors (tests, benches)."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = TinyPersonDetector(**kwargs)
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, path)          # atomic: a reader never sees half a file
    return path
