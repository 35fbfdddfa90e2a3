"""The loops (fit_classifier, fit_gan, fit_simclr, fit_judge) and their optimisers."""
