"""Where the pipeline's files live and what it trains: each name defined here once.

`dvc.yaml` declares the same paths as the stages' deps and outs (a test checks that every stage's
outputs exist after a run). Paths are relative to the repository root, where DVC runs the stages.
"""

from pathlib import Path

from reprovision.config import CLASSIFIER_LABELS, CLASSIFIERS

PARAMS = Path("params.yaml")
PARAMS_CHECKED = Path("data/params-checked.txt")  # check-params: every stage depends on it
PREPARED = Path("data/prepared")  # fetch-data: <dataset>/{train,test}_{x,y}.npy, manifest.json
MANIFEST = PREPARED / "manifest.json"
AUGMENT = Path("data/augment")
POLICY = AUGMENT / "policy.json"  # augment: normalisation stats + augmentation policy
PREVIEW = AUGMENT / "preview.png"
MODELS = Path("models")  # models/<name>/: weights, card.md, run.json
# metrics/<name>.json: the few figures `dvc exp show` compares; metrics/<name>/: the stage's whole
# record (SUMMARY, for the report and the cards) and per-epoch CSVs (dvc plots).
METRICS = Path("metrics")
SUMMARY = "summary.json"
SSL_ENCODER = MODELS / "ssl" / "encoder.pt"  # pretrain-ssl: the encoder's weights (run.json beside them)
GAN_MODELS = MODELS / "gan"  # models/gan/<name>/: weights, pictures, card.md, run.json
GAN_METRICS = METRICS / "gan"  # metrics/gan/<name>.json, metrics/gan/<name>/{summary.json,history.csv,fid.csv}
EVAL_METRICS = METRICS / "eval"  # evaluate: summary.json, <classifier>_confusion.json (metrics/evaluate.json beside it)
RUN_REF = "run.json"  # in each model's folder: the MLflow run that trained it (track_log.write_run_ref)
EMA_WEIGHTS = "model_ema.pt"  # in a classifier's folder when its `ema_decay` > 0: the averaged weights
REPORTS = Path("reports")
FIGURES = REPORTS / "figures"  # evaluate's pictures
CURVES = REPORTS / "curves"  # report's charts
STUDY = REPORTS / "study"  # `reprovision study` (not a stage: git-ignored)
# Committed results that the report stage reads (and depends on): the reference-scale runs (full
# data, reference params), recorded by benchmarks/reference_scale.py, with the pictures of the GAN
# runs in the folder beside the JSON; and the pre-training-set-size study's results (`reprovision
# study --ssl-size --record`; {"runs": []} until recorded).
REFERENCE_SCALE = Path("benchmarks/reference_scale.json")
ABLATIONS = Path(
    "benchmarks/ablations.json"
)  # one entry per run of a "what closes the gap" study (measure/ablation.py)
REFERENCE_SCALE_PICTURES = REFERENCE_SCALE.with_suffix("")
SSL_SIZE_STUDY = Path("benchmarks/ssl_size_study.json")
# Resume checkpoints of the training stages: git-ignored, not DVC outputs (a persist output would
# keep them out of DVC's run-cache); a fingerprint decides whether one may be resumed.
CHECKPOINTS = Path("checkpoints")

# CLASSIFIERS: the classifier families, one per TrainConfig section of config.Params (imported above).
REGISTERED_MODELS = {m: f"reprovision-{m}" for m in CLASSIFIERS}  # MLflow model registry names (registry.py)
GANS = ("mlp", "dcgan")
if clash := set(CLASSIFIERS) & {*GANS, "judge", "ssl", "eval", "gan"}:
    raise ValueError(
        f"the classifier family name {sorted(clash)} is taken by another model's files: rename its params.yaml section"
    )
LABELS = {**CLASSIFIER_LABELS, "mlp": "MLP GAN", "dcgan": "DCGAN", "judge": "LeNet judge"}
# The evaluate stage's heat map of each classifier: FIGURES/<kind>_<name>.png, kind as its family names it.
HEATMAPS = {"rollout": "attention rollout", "gradcam": "Grad-CAM heat maps"}
