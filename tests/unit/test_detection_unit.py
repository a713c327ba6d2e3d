"""Detector settings enter the recipe only when used; the pinned OpenCV ships working HOG, Haar
and SIFT (the detection stage in Ray: tests/integration/test_detection.py)."""
import os

import cv2
import numpy as np
import pytest

from dataprep.build_config import BuildConfig, DetectorConfig, Source


def test_detector_settings_are_in_the_recipe_only_when_used():
    plain = BuildConfig(dataset="/tmp/d", sources=[Source("images", "/tmp/p")])
    assert "detector" not in plain.sample_settings() and "crop" not in plain.sample_settings()
    a = BuildConfig(dataset="/tmp/d", sources=[Source("images", "/tmp/p")], crop="person")
    b = BuildConfig(dataset="/tmp/d", sources=[Source("images", "/tmp/p")], crop="person",
                    detector=DetectorConfig(batch_size=64, actors=3))
    c = BuildConfig(dataset="/tmp/d", sources=[Source("images", "/tmp/p")], crop="person",
                    detector=DetectorConfig(margin=0.3))
    assert a.recipe_hash() == b.recipe_hash() != c.recipe_hash()
    with pytest.raises(ValueError, match="module:callable"):
        DetectorConfig(model="os.system")


def test_pinned_opencv_ships_hog_haar_and_sift():
    # each one works, not just exists: HOG describes a window, SIFT finds the corners of a checkerboard
    assert cv2.HOGDescriptor().compute(np.zeros((128, 64), np.uint8)).size == 3780
    i, j = np.indices((96, 96))
    board = (((i // 16 + j // 16) % 2) * 255).astype(np.uint8)
    assert len(cv2.SIFT_create().detect(board)) > 0
    assert not cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml").empty()
    lock = open(os.path.join(os.path.dirname(__file__), "..", "..", "requirements.lock")).read()
    assert f"opencv-python-headless=={cv2.__version__}." in lock
