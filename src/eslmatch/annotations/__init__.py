"""Third-party evaluation annotations and benchmarks (``docs/evaluation.md``).

- :mod:`.coco`: COCO image ids and caption annotation ids of a split's rows and columns
  (read from id files, or derived from the Karpathy JSON / precomp ids plus COCO's own
  ``captions_*2014.json``);
- :mod:`.extended`: ECCV Caption and CxC positives of the COCO 5K test split (from the
  ``eccv-caption`` package) and their metrics (mAP@R, R-Precision, R@K), vectorised;
- :mod:`.compositional`: SugarCrepe and Winoground, scored with any model family.
"""
