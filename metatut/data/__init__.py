"""Datasets: Omniglot (download, verify, decode once, cache, split) and Lake et al.'s one-shot runs."""
from .omniglot import (
    IMAGES_PER_CHARACTER,
    LOCK_NAME,
    OFFICIAL_ZIPS,
    ONE_SHOT_RUNS_ZIP,
    SMALL_ZIPS,
    URL_PREFIX,
    OmniglotImages,
    OmniglotSplit,
    data_lock,
    decode_png,
    extract_zip,
    fetch_zip,
    fraction_split,
    load_omniglot,
    load_omniglot_from,
    maml_split,
    offline_omniglot_dir,
    omniglot_dir,
    split_characters,
    with_rotations,
)
from .one_shot_runs import (
    BPL_ERROR,
    HUMAN_ERROR,
    OneShotResult,
    OneShotRuns,
    evaluate_one_shot,
    load_one_shot_runs,
    pixel_nearest_neighbour,
)

__all__ = [
    "IMAGES_PER_CHARACTER", "OFFICIAL_ZIPS", "URL_PREFIX", "OmniglotImages", "OmniglotSplit",
    "omniglot_dir", "fetch_zip", "extract_zip", "decode_png", "load_omniglot_from", "load_omniglot",
    "with_rotations", "split_characters", "maml_split", "fraction_split", "SMALL_ZIPS", "ONE_SHOT_RUNS_ZIP",
    "offline_omniglot_dir", "data_lock", "LOCK_NAME",
    "HUMAN_ERROR", "BPL_ERROR", "OneShotRuns", "OneShotResult", "load_one_shot_runs", "evaluate_one_shot",
    "pixel_nearest_neighbour",
]
