"""Data pipeline: 300-W .pts files, folder scanning, face crops, augmentation and the torch Dataset.

Coordinates are 0-based pixels with pixel centres at integers (the .pts files on disk are 1-based). Typical use:

    records, problems = scan_folder(root)
    train, val = split_by_person(records)
    loader = DataLoader(LandmarkDataset(train, augment=True), batch_size=16, shuffle=True)  # default collate
"""
from lgc_fast.data.backgrounds import (OUTSIDE, SYNTHETIC, BackgroundDataset, FacesAndBackgrounds, background_count,
                                       random_square_crop, scan_backgrounds)
from lgc_fast.data.batch import affines_from_draws, apply_affines, augment_batch, random_affines
from lgc_fast.data.dataset import LandmarkDataset, draw_augmentation, read_gray
from lgc_fast.data.geometry import (MIRROR_68, box_to_square, compose, crop_transform, face_box, square_to_box,
                                    transform_points, warp_image)
from lgc_fast.data.pts import read_pts, write_pts
from lgc_fast.data.records import FaceRecord, load_boxes, person_of, scan_folder, split_by_person

__all__ = [
    "MIRROR_68", "OUTSIDE", "SYNTHETIC", "BackgroundDataset", "FaceRecord", "FacesAndBackgrounds", "LandmarkDataset",
    "affines_from_draws", "apply_affines", "augment_batch", "background_count", "box_to_square", "compose",
    "crop_transform", "draw_augmentation", "face_box", "load_boxes", "person_of", "random_affines",
    "random_square_crop", "read_gray", "read_pts", "scan_backgrounds", "scan_folder", "split_by_person",
    "square_to_box", "transform_points", "warp_image", "write_pts",
]
