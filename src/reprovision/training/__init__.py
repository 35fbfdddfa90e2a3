"""The loops (fit_classifier, fit_gan, fit_simclr, fit_judge), the skeleton three of them share (loop.py),
what ships (shipping.py) and their optimisers."""
