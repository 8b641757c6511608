"""The scratch detector's machinery, beneath the entry scripts train.py, infer.py and evaluate.py.

Import rule: scripts -> scratch_detector -> core modules dataset.py and gradcam.py (which import only
scratch_detector.runtime); nothing imports a script; no circles.

    settings.py   one inference run's settings (RunSettings), DEFAULT_CAM, output names and CSV columns
    memory.py     batch size and model streams fitted to infer.py's --max-memory
    inference.py  one inference run: list, pending, engine, assemble, clean up (infer.py calls it)
    engines/      local.py (threads in this process) and ray_pool.py (a Ray Data actor pool):
                  run(todo, settings, journal, header), the same per-image work (pipeline.py)
    pipeline.py   per-image work: decode into units, predict, aggregate, write the overlay
    storage.py    the run's input listing and journal, on disk
    tiler.py      tiles of a large frame, and their heatmaps blended back
    overlay.py    the overlay image and its file encoding
    review.py     the review page (its CSS and JS: review_assets/); report.py: report.pdf
    evaluation.py one evaluation (evaluate.py calls it); metrics.py: classification and localization metrics
    model.py      the network and its checkpoint; augment.py: train.py's augmentation policy;
                  perturb.py: camera changes; curves.py: the training-curve plot; runtime.py: process plumbing
    training_data.py  train.py's splits (NEU, a fine-tune's, a fold; the replay) and the test_images/ copies
    finetune.py   train.py --init --labels --replay: the NEU replay and the before/after table
"""
