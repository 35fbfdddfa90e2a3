"""One colour per model, the same in every chart (the report's and the study's)."""

import seaborn as sns

from reprovision.layout import CLASSIFIERS, GANS, LABELS

# Keyed by label, as the charts' legends are.
COLOURS = dict(zip((LABELS[m] for m in (*CLASSIFIERS, *GANS)), sns.color_palette("deep")))
